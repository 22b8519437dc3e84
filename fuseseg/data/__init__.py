"""Data layer shared by every stage: image reading/writing, pairing by file stem, data-set
layouts (MSRS), colour conversion and the synthetic MSRS-like scene generator."""
