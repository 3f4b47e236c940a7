"""Model-agnostic parallel machinery the step pipelines inherit: CFG-parallel and
pipeline-parallel mixins, `AsyncLatents`, and the process groups of the worker grid."""
