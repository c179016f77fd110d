"""facetrain.build: writing datasets: InsightFace-layout RecordIO from image folders
(folders.py), long-tailed subsets (longtail.py), merges (merge.py), verification packs
(packs.py) and face alignment (align.py, align_folder.py, landmarks.py), all through one atomic
writer (writer.py) into output folders checked by output.py.

It reads through `facetrain.data`; nothing in `facetrain.data` imports it.
"""
