"""Connections with credentials — user/password, token, TLS with a private CA, NKey — through
``--nats``/env (NBFLOW_NATS_USER, _PASSWORD, _TOKEN, _NKEY, _CREDS, _CA), and secrets never in
logs or history. Each test runs its own nats-server on 127.0.0.1 with its own auth config."""
from __future__ import annotations

import asyncio
import datetime
import importlib.util
import ipaddress
import json
import secrets

import pytest
from click.testing import CliRunner

from support import check_replay
from nbhelpers import write_notebook

from nbflow.cli.main import main as cli
from nbflow.client import SyncClient
from nbflow.nats import infra
from nbflow.stack import NatsServer, Supervisor

FAST = {"NBFLOW_TASK_ACK_WAIT": "3", "NBFLOW_ENGINE_ACK_WAIT": "3"}
CRED_VARS = ("NBFLOW_NATS_USER", "NBFLOW_NATS_PASSWORD", "NBFLOW_NATS_TOKEN", "NBFLOW_NATS_NKEY",
             "NBFLOW_NATS_CREDS", "NBFLOW_NATS_CA", "NBFLOW_NATS_CERT", "NBFLOW_NATS_KEY")


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch):
    for v in CRED_VARS:
        monkeypatch.delenv(v, raising=False)


def connect(url, **kw):
    async def go():
        nc = await infra.connect(infra.ConnectOptions.from_env(url, **kw), reconnect=False)
        await nc.close()
        return True
    return asyncio.run(go())


def cli_env(**kw) -> dict:
    return {f"NBFLOW_NATS_{k.upper()}": v for k, v in kw.items()}


@pytest.fixture
def server(tmp_path):
    started = []

    def make(conf: str) -> NatsServer:
        s = NatsServer(tmp_path / f"nats{len(started)}", extra_conf=conf).start()
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()


def test_user_password_stack_runs_and_the_password_is_never_logged(server, tmp_path):
    pw = "pw-" + secrets.token_hex(12)
    srv = server(f'authorization {{ user: "nbuser", password: "{pw}" }}')
    creds = cli_env(user="nbuser", password=pw)
    log = tmp_path / "stack.log"
    sup = Supervisor(srv.url, workers=1, namespace="auth", env={**FAST, **creds},
                     log_file=log).start().supervise()
    try:
        nb = write_notebook(tmp_path / "auth.ipynb", ["%%task a\nx = 21", "%%task b\ny = 2 * x",
                                                       "%%task c\nprint(y)"])
        r = CliRunner().invoke(cli, ["run", str(nb), "--no-wait", "--nats", srv.url,
                                     "--namespace", "auth"], env=creds)
        assert r.exit_code == 0, r.output
        run = r.output.strip().splitlines()[-1]
        with SyncClient(srv.url, namespace="auth", user="nbuser", password=pw) as c:
            st = c.wait(run, timeout=120)
            assert st.state == "succeeded"
            assert c.load_output(run, "b", "y") == 42
            check_replay(c, run)
        hist = CliRunner().invoke(cli, ["history", run, "--json", "--nats", srv.url,
                                        "--namespace", "auth"], env=creds)
        assert hist.exit_code == 0, hist.output
        events = json.loads(hist.output)          # one JSON document: the list of events
        assert [e["type"] for e in events].count("TaskSucceeded") == 3
        assert pw not in hist.output
        status = CliRunner().invoke(cli, ["status", run, "--json", "--nats", srv.url,
                                          "--namespace", "auth"], env=creds)
        assert status.exit_code == 0 and pw not in status.output
    finally:
        sup.stop()
    text = log.read_text(errors="replace")
    assert "engine INFO" in text and "run " + run in text      # the log is real and has content
    assert pw not in text


def test_credentials_in_the_url_work_and_are_redacted_in_errors(server):
    pw = "pw-" + secrets.token_hex(8)
    srv = server(f'authorization {{ user: "u", password: "{pw}" }}')
    host = f"127.0.0.1:{srv.port}"
    assert connect(f"nats://u:{pw}@{host}")
    bad = "wrong-" + secrets.token_hex(8)
    with pytest.raises(infra.ConnectError) as e:
        connect(f"nats://u:{bad}@{host}")
    msg = str(e.value)
    assert "authorization violation" in msg.lower()
    assert bad not in msg and pw not in msg and "***@" in msg


def test_wrong_or_missing_password_is_one_clear_error(server):
    pw = "pw-" + secrets.token_hex(8)
    srv = server(f'authorization {{ user: "u", password: "{pw}" }}')
    assert connect(srv.url, user="u", password=pw)
    with pytest.raises(infra.ConnectError, match="(?i)authorization violation") as e:
        connect(srv.url, user="u", password="nope-" + pw[::-1])
    assert pw[::-1] not in str(e.value)
    with pytest.raises(infra.ConnectError, match="(?i)authorization violation"):
        connect(srv.url)
    r = CliRunner().invoke(cli, ["runs", "--nats", srv.url], env=cli_env(user="u", password="x"))
    assert r.exit_code == 2 and "authorization violation" in r.output.lower()
    assert "Traceback" not in r.output


def test_token_through_env_and_cli(server):
    tok = "tok-" + secrets.token_hex(16)
    srv = server(f'authorization {{ token: "{tok}" }}')
    r = CliRunner().invoke(cli, ["runs", "--json", "--nats", srv.url], env=cli_env(token=tok))
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == []
    r = CliRunner().invoke(cli, ["status", "nosuchrun", "--nats", srv.url],
                           env=cli_env(token=tok))
    assert r.exit_code == 2 and "no run 'nosuchrun'" in r.output
    r = CliRunner().invoke(cli, ["runs", "--nats", srv.url], env=cli_env(token="bad" + tok))
    assert r.exit_code == 2 and "authorization violation" in r.output.lower()
    assert tok not in r.output
    assert connect(f"nats://{tok}@127.0.0.1:{srv.port}")          # token in the URL


# --- TLS with a private CA ----------------------------------------------------------------------

def _make_ca_and_server_cert(d):
    pytest.importorskip("cryptography", reason="TLS test needs the cryptography package")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def pem_key(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nbflow test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server-key.pem").write_bytes(pem_key(key))
    return d / "ca.pem", d / "server.pem", d / "server-key.pem"


def test_tls_with_a_private_ca(server, tmp_path):
    ca, cert, key = _make_ca_and_server_cert(tmp_path / "pki")
    srv = server(f'tls {{ cert_file: "{cert}"\n key_file: "{key}" }}')
    tls_url = f"tls://127.0.0.1:{srv.port}"
    assert connect(tls_url, tls_ca=str(ca))
    r = CliRunner().invoke(cli, ["runs", "--json", "--nats", tls_url], env=cli_env(ca=str(ca)))
    assert r.exit_code == 0, r.output
    with pytest.raises(infra.ConnectError, match="(?i)certificate verify failed"):
        connect(tls_url)                                   # the system CAs do not know ours
    with pytest.raises(infra.ConnectError, match="NBFLOW_NATS_CA: no such file"):
        connect(tls_url, tls_ca=str(tmp_path / "missing.pem"))


def test_tls_stack_runs_end_to_end(server, tmp_path):
    ca, cert, key = _make_ca_and_server_cert(tmp_path / "pki")
    srv = server(f'tls {{ cert_file: "{cert}"\n key_file: "{key}" }}')
    tls_url = f"tls://127.0.0.1:{srv.port}"
    sup = Supervisor(tls_url, workers=1, namespace="tls", env={**FAST, **cli_env(ca=str(ca))},
                     log_file=tmp_path / "stack.log").start().supervise()
    try:
        nb = write_notebook(tmp_path / "tls.ipynb", ["%%task a\nx = 1"])
        with SyncClient(tls_url, namespace="tls", tls_ca=str(ca)) as c:
            run = c.submit(str(nb), {})
            assert c.wait(run, timeout=120).state == "succeeded"
    finally:
        sup.stop()


# --- NKey ---------------------------------------------------------------------------------------

HAS_NKEYS = importlib.util.find_spec("nkeys") is not None


@pytest.mark.skipif(not HAS_NKEYS, reason="the 'nkeys' package is not installed (nats-py needs "
                    "it to sign the server nonce); `pip install nkeys` to run this test")
def test_nkey_seed_file(server, tmp_path):
    import nkeys

    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    kp = nkeys.from_seed(seed)
    srv = server(f'authorization {{ users: [ {{ nkey: "{kp.public_key.decode()}" }} ] }}')
    (tmp_path / "user.nk").write_bytes(seed)
    assert connect(srv.url, nkey=str(tmp_path / "user.nk"))
    r = CliRunner().invoke(cli, ["runs", "--json", "--nats", srv.url],
                           env=cli_env(nkey=str(tmp_path / "user.nk")))
    assert r.exit_code == 0, r.output
    assert seed.decode() not in r.output


@pytest.mark.skipif(HAS_NKEYS, reason="checks the error shown when 'nkeys' is missing")
def test_nkey_without_the_nkeys_package_is_a_clear_error(tmp_path):
    seed = tmp_path / "user.nk"
    seed.write_text("SUAFAKEFAKEFAKE")
    with pytest.raises(infra.ConnectError, match="need the 'nkeys' package"):
        connect("nats://127.0.0.1:1", nkey=str(seed))
    r = CliRunner().invoke(cli, ["runs", "--nats", "nats://127.0.0.1:1"],
                           env=cli_env(creds=str(seed)))
    assert r.exit_code == 2 and "pip install nkeys" in r.output and "Traceback" not in r.output


def test_missing_credential_files_are_named(tmp_path):
    for var, kw in (("NBFLOW_NATS_NKEY", "nkey"), ("NBFLOW_NATS_CREDS", "creds"),
                    ("NBFLOW_NATS_CA", "tls_ca")):
        with pytest.raises(infra.ConnectError, match=f"{var}: no such file"):
            connect("nats://127.0.0.1:1", **{kw: str(tmp_path / "nope")})


def test_redact_hides_user_password_and_token():
    url = "nats://ann:s3cr3t@h1:4222,nats://tok3n@h2:4223,nats://h3:4224"
    out = infra.redact(url)
    assert "s3cr3t" not in out and "tok3n" not in out and "ann" not in out
    assert out == "nats://***@h1:4222,nats://***@h2:4223,nats://h3:4224"
