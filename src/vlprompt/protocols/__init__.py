"""Everything above one run: the few-shot grid, the field's protocols as studies, the results
store and the reports. `vlprompt.engine.run` runs one configuration; this package decides which ones."""
