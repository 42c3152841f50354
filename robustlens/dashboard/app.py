"""Dashboard entry point: wires the pages (scripts in views/; not pages/, which Streamlit would treat as a
legacy multipage folder); no logic lives here."""

import streamlit as st

from robustlens.dashboard.routes import all_pages

# An emoji favicon is drawn by the browser (a data: URL); a :material/…: one would be fetched from
# fonts.gstatic.com on every page load — the dashboard makes no request outside the server it runs on.
st.set_page_config(page_title="robustlens", page_icon="🔎", layout="wide")
st.navigation(all_pages()).run()
