"""BPMN 2.0: :mod:`.export` writes the workflow IR as BPMN XML with a diagram (valid against the
OMG XSDs); :mod:`.importer` reads models back, nbflow's own exactly and other tools' when their
meaning survives (else one error naming every element it refuses) with the help of
:mod:`.reading`, :mod:`.rewrite`, :mod:`.elements` and :mod:`.tokens`. See docs/bpmn.md."""
from nbflow.compiler.bpmn.common import (BPMN_NS, NBFLOW_NS, PYTHON_LANGUAGE, iso_duration,
                                         parse_duration)
from nbflow.compiler.bpmn.export import to_bpmn
from nbflow.compiler.bpmn.importer import from_bpmn

__all__ = ["BPMN_NS", "NBFLOW_NS", "PYTHON_LANGUAGE", "from_bpmn", "iso_duration", "parse_duration",
           "to_bpmn"]
