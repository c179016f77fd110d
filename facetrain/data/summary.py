"""What a dataset holds: layout, shards, classes, images, per-class count histogram, bad images."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from facetrain.data import recordio as rio
from facetrain.data.dataset import RecordDataset
from facetrain.data.errors import DatasetError

HIST_EDGES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def count_histogram(counts: np.ndarray) -> List[tuple]:
    """[(lo, hi or None, number of classes with lo <= K_i < hi)] over HIST_EDGES."""
    rows = []
    edges = list(HIST_EDGES) + [None]
    if (counts < 1).any():
        rows.append((0, 1, int((counts < 1).sum())))
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (counts >= lo) if hi is None else (counts >= lo) & (counts < hi)
        rows.append((lo, hi, int(m.sum())))
    return rows


def check_decode(ds: RecordDataset, limit: Optional[int] = None, progress: bool = False
                 ) -> List[str]:
    """Places (file, key, offset) of images that cannot be read or decoded, over the first
    `limit`, each with the reason; `progress` shows a bar on stderr (it is the slow step)."""
    import cv2

    bad = []
    n = len(ds) if limit is None else min(limit, len(ds))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, unit="img", desc="decode", mininterval=1.0, leave=False)
    try:
        for i in range(n):
            try:
                _, img = ds.read(i)
            except (rio.RecordIOError, DatasetError) as exc:   # damaged inside a split record
                bad.append(str(exc))
                continue
            arr = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_COLOR) if img else None
            if arr is None:
                bad.append(f"{ds.where(i)}: not a decodable image")
            if bar is not None and (i + 1) % 256 == 0:
                bar.update(256)
    finally:
        if bar is not None:
            bar.close()
    return bad


def describe(path: str, decode: Optional[int] = 0, rebuild_index: bool = False,
             progress: bool = False) -> Dict:
    """A summary dict; decode=None checks every image, 0 none, n the first n. Opening the
    dataset checks the framing (magic word, length) at every indexed offset, so a summary is
    only returned for a dataset whose every record can be found."""
    ds = RecordDataset.open(path, rebuild_index=rebuild_index)
    try:
        c = ds.class_counts
        info = {
            "layout": ds.layout,
            "shards": [str(s.rec) for s in ds.shards],
            "framing": "ok at every indexed offset",
            "classes": ds.num_classes,
            "images": len(ds),
            "image_shape": ds.image_shape,
            "images_per_class": {"min": int(c.min()), "median": float(np.median(c)),
                                 "mean": float(c.mean()), "max": int(c.max())},
            "histogram": count_histogram(c),
        }
        if decode != 0:
            info["undecodable"] = check_decode(ds, decode, progress)
        return info
    finally:
        ds.close()


def format_summary(info: Dict) -> str:
    lines = [f"layout        {info['layout']}",
             f"shards        {len(info['shards'])} ({info['shards'][0]}"
             f"{' ...' if len(info['shards']) > 1 else ''})",
             f"framing       {info.get('framing', 'not checked')}",
             f"classes       {info['classes']}",
             f"images        {info['images']}",
             f"image shape   {info['image_shape'] or 'unknown (no property file)'}"]
    s = info["images_per_class"]
    lines.append(f"per class     min {s['min']}  median {s['median']:g}  mean {s['mean']:.1f}  "
                 f"max {s['max']}")
    lines.append("images/class  classes")
    for lo, hi, n in info["histogram"]:
        rng = f"{lo}+" if hi is None else (f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}")
        lines.append(f"  {rng:>10}  {n}")
    if "undecodable" in info:
        bad = info["undecodable"]
        lines.append(f"undecodable   {len(bad)}")
        lines += [f"  {b}" for b in bad[:20]]
    return "\n".join(lines)
