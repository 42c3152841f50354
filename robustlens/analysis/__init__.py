"""The analysis engine: ingestion, workspace storage and analysis stages. Never imports streamlit."""
