"""The query layer: the one read model over a workspace's artifacts and curation state.

Used by the dashboard, the CLI and export alike: the sample table (:mod:`.sample_table`), the filter engine
(:mod:`.filters`), summaries (:mod:`.summary`) and export (:mod:`.export`). It reads artifacts; it never
runs a stage and never imports streamlit.
"""
