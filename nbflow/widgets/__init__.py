"""Live run widgets: RunView (one run), RunsList (recent runs), RunModel (their pure logic)."""
from nbflow.widgets.model import RunModel
from nbflow.widgets.runs import RunsList
from nbflow.widgets.runview import RunView
from nbflow.widgets.session import last_view, shared_client

__all__ = ["RunModel", "RunView", "RunsList", "last_view", "shared_client"]
