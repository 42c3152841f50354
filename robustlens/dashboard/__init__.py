"""The Streamlit dashboard: thin views over workspace artifacts and the curation database."""
