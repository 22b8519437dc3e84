"""Downstream segmentation: DeepLabV3+ (segmentation-models-pytorch) trained on infrared, visible
or fused images under one fixed protocol (Dice + CE, SGD, cosine lr, frozen-encoder warm-up), and
mIoU from one confusion matrix over the whole test set.

Public API: :class:`segmentation.config.SegConfig`, :func:`segmentation.train.train_segmenter`,
:func:`segmentation.evaluate.evaluate_segmenter` / :class:`segmentation.evaluate.SegResult`, and
the pure metric functions in :mod:`segmentation.metrics`.
"""
