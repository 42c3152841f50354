"""Dashboard entry point: wires the pages (scripts in views/; not pages/, which Streamlit would treat as a
legacy multipage folder); no logic lives here."""

import streamlit as st

from robustlens.dashboard.routes import all_pages

st.set_page_config(page_title="robustlens", page_icon=":material/center_focus_strong:", layout="wide")
st.navigation(all_pages()).run()
