"""The embedded glyph benchmark's generator: CJK characters as identities, font designs as their
photos. A client of the facetrain library (it writes through facetrain.build), installed beside
it for data_tools/build_glyphs.py, data_tools/make_longtail.py's default input and the study.

fonts.py finds one face per installed design, render.py draws centred glyphs, build.py picks
characters and writes the training RecordIO, eval_sets.py the held-out evaluation sets.
"""
