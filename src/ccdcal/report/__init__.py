"""The HTML QA report and the previews it shows (`page`, `templates/`)."""
