"""The "Python 3 (nbflow)" kernel: ipykernel with the nbflow extension loaded, so notebooks need
no ``%load_ext nbflow``. ``nbflow kernel install [--user|--sys-prefix|--prefix P]``."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

KERNEL_NAME = "nbflow"
DISPLAY_NAME = "Python 3 (nbflow)"
_HERE = Path(__file__).resolve().parent
_SOURCES = (_HERE.parent / "kernels" / "nbflow", )


def kernel_json(python: str | None = None) -> dict:
    return {
        "argv": [python or sys.executable, "-m", "ipykernel_launcher", "-f",
                 "{connection_file}", "--ext=nbflow"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "metadata": {"debugger": True},
    }


def install(user: bool = False, prefix: str | None = None, name: str = KERNEL_NAME,
            python: str | None = None) -> str:
    """Write the kernelspec (with this Python) and install it; returns the installed dir."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / name
        d.mkdir()
        for src in _SOURCES:                       # logos, when the source tree has them
            for f in src.glob("logo-*.png") if src.is_dir() else []:
                shutil.copy(f, d / f.name)
        (d / "kernel.json").write_text(json.dumps(kernel_json(python), indent=1) + "\n")
        return KernelSpecManager().install_kernel_spec(str(d), name, user=user, prefix=prefix)


kernel = click.Group("kernel", help="The 'Python 3 (nbflow)' Jupyter kernel (nbflow preloaded).")


@kernel.command("install")
@click.option("--user", "where", flag_value="user", help="install for this user")
@click.option("--sys-prefix", "where", flag_value="sys-prefix",
              help="install into this Python's prefix (virtualenv/conda env; Binder)")
@click.option("--prefix", type=click.Path(file_okay=False), default=None,
              help="install under PREFIX/share/jupyter/kernels")
@click.option("--name", default=KERNEL_NAME, show_default=True, help="kernelspec name")
def install_cmd(where: str | None, prefix: str | None, name: str) -> None:
    """Install the kernelspec (default: --user)."""
    if prefix and where:
        raise click.UsageError("--prefix cannot be combined with --user/--sys-prefix")
    if where == "sys-prefix":
        prefix = sys.prefix
    dest = install(user=prefix is None, prefix=prefix, name=name)
    click.echo(f"installed kernel {name!r} ({DISPLAY_NAME}) in {dest}")


@kernel.command("path")
def path_cmd() -> None:
    """Print where the kernelspec is installed (if it is)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        click.echo(KernelSpecManager().get_kernel_spec(KERNEL_NAME).resource_dir)
    except NoSuchKernel:
        raise click.ClickException("not installed: `nbflow kernel install --user`") from None


def main() -> None:  # `python -m nbflow.kernelspec install ...` until cli.py registers `kernel`
    kernel(prog_name="nbflow kernel")


if __name__ == "__main__":
    main()
