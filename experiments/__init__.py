"""The study harness: a client of the facetrain library, not part of it.

`jobs` builds the embedded glyph benchmark and trains every (method, seed) by running the
repository's data_tools/ and launch/ scripts; `evaluation` scores each exported backbone with
facetrain.eval; `report` turns the runs into paired tables and plots. `main_job` and
`study_tables` are the command lines over it: `python -m experiments.main_job` and
`python -m experiments.study_tables`, from the repository root.
"""
