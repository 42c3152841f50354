"""Dashboard entry point: wires the pages (modules in views/; not pages/, which Streamlit would treat as a
legacy multipage folder); no logic lives here."""

import streamlit as st

from robustlens.dashboard.views import overview

st.set_page_config(page_title="robustlens", page_icon=":material/center_focus_strong:", layout="wide")
navigation = st.navigation([
    st.Page(overview.render, title="Overview", icon=":material/dashboard:", url_path="overview", default=True),
])
navigation.run()
