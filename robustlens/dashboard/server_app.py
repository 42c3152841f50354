"""What ``robustlens serve`` runs: the dashboard (``app.py``) as a Streamlit ``st.App`` with the DNS-rebinding
guard (:mod:`robustlens.dashboard.host_guard`) in front of every HTTP request and WebSocket.

``streamlit run server_app.py`` finds ``app`` below (Streamlit's documented ASGI entry point) and serves it
with uvicorn; ``st.App``'s ``middleware`` runs before Streamlit's own routes. The guard's settings come
from the environment ``robustlens serve`` sets. AppTest and tests of single pages use ``app.py`` directly.
"""

from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

from robustlens.dashboard.host_guard import HostGuard

app = st.App(Path(__file__).with_name("app.py"), middleware=[Middleware(HostGuard)])
