"""Learned fusion models, one module each (SSPFusion: :mod:`fusion.models.sspfusion`).

A new learned method arrives as one file here -- an ``nn.Module`` registered with
``@register_method("name", trainable=True)`` that implements the contract of
:mod:`fusion.registry` plus ``phases``, ``training_losses``, ``parameters_for_phase`` and
``init_kwargs`` -- and one registration: its module name added to ``BUILTIN_MODULES`` in
:mod:`fusion.registry`, which imports the built-ins (so their decorators run) the first time the
registry is asked for a method. The pipeline then trains, checkpoints, resumes and fuses with it
exactly like SSPFusion. Design notes, parameter counts and departures from the papers:
``fusion/README.md`` (SSPFusion; section "Learned peers" for SeAFusion, DIDFuse, RFN-Nest).
"""
