"""The study harness: a client of the facetrain library, not part of it.

`jobs` builds the embedded glyph benchmark and trains every (method, seed) by running the
repository's data_tools/ and launch/ scripts; `evaluation` scores each exported backbone with
facetrain.eval; `report` turns the runs into paired tables and plots. launch/main_job.py and
launch/study_tables.py are the command lines over it. Import it from the repository root.
"""
