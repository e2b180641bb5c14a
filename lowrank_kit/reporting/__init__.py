"""The run report: JSON and Markdown."""
