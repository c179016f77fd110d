"""facetrain.eval: evaluation protocols as library functions (the CLIs in eval_protocols/ are thin
wrappers). Modules (imported on demand; nothing runs at import):

- embed: load_backbone, extract_features (decode, resize, [-1, 1], flip-sum), load_features
- metrics: roc_curve, tpr_at_fpr, verification_kfold, TopScores, cmc_map_from_ranks
- verification: LFW-style .bin packs
- ijbc / ijbc_1n: IJB-C / IJB-B 1:1 verification and 1:N identification
- megaface: MegaFace Challenge 1 devkit feature files and evaluator
- reid: Market-1501 / DukeMTMC-reID mAP and CMC
- plots: ROC and CMC PNGs
"""
