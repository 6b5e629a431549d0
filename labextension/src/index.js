// JupyterLab: "nbflow console" in the launcher, the Help menu and the command palette; opens
// the console served by this Jupyter server's nbflow extension (<base_url>/nbflow/) in a tab.
import { ILauncher } from "@jupyterlab/launcher";
import { ICommandPalette, IFrame, MainAreaWidget } from "@jupyterlab/apputils";
import { IMainMenu } from "@jupyterlab/mainmenu";
import { PageConfig, URLExt } from "@jupyterlab/coreutils";

const COMMAND = "nbflow:open-console";
const ICON = "data:image/svg+xml;utf8," + encodeURIComponent(
  '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g fill="none" stroke="#14324f" ' +
  'stroke-width="2"><circle cx="5" cy="12" r="3"/><rect x="10" y="3" width="10" height="6" rx="2"/>' +
  '<rect x="10" y="15" width="10" height="6" rx="2"/><path d="M8 11l2-4M8 13l2 4"/></g></svg>');

const plugin = {
  id: "nbflow-console:plugin",
  autoStart: true,
  optional: [ILauncher, ICommandPalette, IMainMenu],
  activate: (app, launcher, palette, mainMenu) => {
    let widget = null;
    app.commands.addCommand(COMMAND, {
      label: "nbflow console",
      caption: "Approvals inbox, runs, schedules and workers of nbflow",
      iconClass: "nbflow-console-icon",
      execute: () => {
        if (!widget || widget.isDisposed) {
          const frame = new IFrame({
            sandbox: ["allow-scripts", "allow-same-origin", "allow-forms", "allow-popups",
                      "allow-downloads", "allow-popups-to-escape-sandbox"]
          });
          frame.url = URLExt.join(PageConfig.getBaseUrl(), "nbflow/");
          widget = new MainAreaWidget({ content: frame });
          widget.id = "nbflow-console";
          widget.title.label = "nbflow console";
          widget.title.closable = true;
          widget.addClass("nbflow-console-panel");
        }
        if (!widget.isAttached) {
          app.shell.add(widget, "main");
        }
        app.shell.activateById(widget.id);
        return widget;
      }
    });
    const style = document.createElement("style");
    style.textContent = ".nbflow-console-icon{background-image:url('" + ICON + "');" +
      "background-size:contain;background-repeat:no-repeat;background-position:center;}";
    document.head.appendChild(style);
    if (launcher) {
      launcher.add({ command: COMMAND, category: "Other", rank: 1 });
    }
    if (palette) {
      palette.addItem({ command: COMMAND, category: "nbflow" });
    }
    if (mainMenu) {
      mainMenu.helpMenu.addGroup([{ command: COMMAND }], 5);
    }
  }
};

export default plugin;
