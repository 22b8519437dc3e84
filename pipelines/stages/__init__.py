"""The stages of ``fuseseg run``, one module each, in the order they run (:data:`STAGES`):

* :mod:`~pipelines.stages.data` -- the data set: generated or located, validated once;
* :mod:`~pipelines.stages.train_fusion` -- train each learned fusion method;
* :mod:`~pipelines.stages.fuse` -- fuse the train and test splits with each method;
* :mod:`~pipelines.stages.metrics` -- fusion quality metrics of the fused test images;
* :mod:`~pipelines.stages.segment` -- one segmenter per input variant and seed, evaluated;
* :mod:`~pipelines.stages.report` -- the mIoU table and the report.

:mod:`~pipelines.stages.base` holds what they share (the plan, the stage block, stage folders).
``pipelines.run`` calls them in order; a stage never imports ``pipelines.run``.
"""
from pipelines.runstate import STAGES

__all__ = ["STAGES", "SegmentJob", "TrainFusionJob"]


def __getattr__(name: str):
    # job pickles of fuseseg 0.1.0 (submitit's *_submitted.pkl of a job that is still queued, or
    # requeued) name the job classes pipelines.stages.TrainFusionJob / SegmentJob
    if name == "TrainFusionJob":
        from pipelines.stages.train_fusion import TrainFusionJob

        return TrainFusionJob
    if name == "SegmentJob":
        from pipelines.stages.segment import SegmentJob

        return SegmentJob
    raise AttributeError(f"module 'pipelines.stages' has no attribute {name!r}")
