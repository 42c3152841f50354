"""The query layer: the one read model over a workspace's artifacts and curation state.

Used by the dashboard, the CLI and export alike. It reads artifacts only through
:mod:`robustlens.analysis.artifacts` (one reader per artifact kind); it never runs a stage, never opens an
artifact file itself and never imports streamlit. ``robustlens.analysis`` never imports it.

=====================  ==========================================================================================
module                 what it serves
=====================  ==========================================================================================
:mod:`.sample_table`   one row per sample with every per-sample artifact joined by id (``<source>.<column>``),
                       column lists and the filter widgets' column summaries
:mod:`.filters`        the filter engine (:class:`~.filters.FilterSpec`), URL form, saved-filter evaluation
:mod:`.slices`         slice membership (:class:`~.slices.SliceMembership`) and the filter of a slice-table row
:mod:`.neighbours`     nearest samples by embedding
:mod:`.summary`        workspace and analysis summaries (``robustlens info``, the overview page)
:mod:`.export`         tables, ImageFolder copies and relabel files of a selection
``review``,            the review queue and duplicate clusters (the dashboard helper's modules)
``duplicates``
=====================  ==========================================================================================
"""
