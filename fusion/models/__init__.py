"""The room of learned fusion models: one file per method, each a registered trainable
``nn.Module`` (see :mod:`fusion.registry` for the contract and :mod:`fusion.train` for the training
interface). Design notes, parameter counts and departures from the papers: ``fusion/README.md``,
section "Learned peers"."""
