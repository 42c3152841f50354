"""Building blocks the dashboard's pages share, one module per concern.

=================  ==========================================================================================
module             holds
=================  ==========================================================================================
``markup``         the escape helpers every user string goes through: ``text`` (markdown), ``code`` (inline
                   code), ``plot_text`` (plotly / HTML)
``frame``          the page frame (``run_page``: artifacts stamp once per run, name box, title and caption
                   from :mod:`~robustlens.dashboard.routes`, notices, errors as messages) and its helpers
                   (``require_user``, ``analysis_missing``, ``done``, ``filtered_positions_or_stop``,
                   ``hold_widget_value``)
``filter_panel``   the sidebar filter, seeded from the session / a shared link, read back into a FilterSpec
``navigation``     ``open_in_explorer`` / ``explorer_link``: a filter opened on the explorer page
``grid``           the thumbnail grid with select boxes and Details buttons; selection helpers
``bulk_curation``  tag / untag / add to collection / new collection for a selection or a filter result
``slice_tables``   slice tables whose rows open the explorer; each row's filter is carried beside the table
``sample_detail``  one sample: image, facts, predictions, issues, tags, decisions, metrics, neighbours
=================  ==========================================================================================

Reads go through :mod:`robustlens.dashboard.data` (and the query layer, :mod:`robustlens.query`); writes go
through the curation store. Nothing here computes what a stage or the query layer computes.
"""
