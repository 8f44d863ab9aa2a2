"""Run directories: layout, manifest, crash-safe writes."""

from tunelab.runs.rundir import RunDir, RunExistsError

__all__ = ["RunDir", "RunExistsError"]
