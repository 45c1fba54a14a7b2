#!/usr/bin/env python3
"""Write and validate testdata/mofa-predict/corpus/: published LLM
pre-training throughputs, one JSONL file per independent source, in
mofa-predict's input schema plus `measured` and `source` (README.md in that
folder documents every field and unit).

Every number below is transcribed from the cited table; nothing is estimated.
Where a configuration field is not published, the row takes the framework's
documented default and says so in source.note; rows whose configuration cannot
be determined are left out. Stdlib only.

Usage (from the repository root):
  python3 testdata/gen/mofa_corpus.py            # validate every corpus file, print per-source counts
  python3 testdata/gen/mofa_corpus.py --write    # regenerate the files from the transcriptions below, then validate
  python3 testdata/gen/mofa_corpus.py --check    # exit 1 if the files differ from what --write would produce
  python3 testdata/gen/mofa_corpus.py --dir DIR  # validate the *.jsonl files (and README.md) in DIR instead
Exit status: 0 valid, 1 invalid or (with --check) stale.
"""
import json
import sys
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "mofa-predict" / "corpus"

# Preset-style GPU names used in cluster.gpu (README: "GPU names").
GPUS = {
    "A100-SXM4-80GB": 312.0,
    "A100-40GB": 312.0,
    "H100-SXM5-80GB": 989.0,
    "H200": 989.0,
}

SOURCES = {}


def source(slug, extend=False):
    """Register a generator of one source's rows; extend=True appends to an earlier one."""
    def deco(fn):
        if extend:
            prev = SOURCES[slug]
            SOURCES[slug] = lambda: prev() + fn()
        else:
            assert slug not in SOURCES, slug
            SOURCES[slug] = fn
        return fn
    return deco


def row(id_, model, cluster, strategy, measured, src, confidence, framework):
    return {"id": id_, "model": model, "cluster": cluster, "strategy": strategy,
            "measured": measured, "source": src, "confidence": confidence,
            "framework": framework}


# ---------------------------------------------------------------------------
# 1. MosaicML llm-foundry: MPT training benchmarks (FSDP, 125M-70B, 512-65k
#    tokens, A100-40GB / A100-80GB / H100). Columns kept from the README tables:
#    table model seq gpus MFU% HFU% modelTFLOP mbs accum gbs tokens/s/GPU
#    precision(amp=amp_bf16) mp_mode sharding(F=FULL_SHARD, G=SHARD_GRAD_OP)
#    activation_checkpointing(1/0) NumParams. The FP8 table is left out (BF16 only).
FOUNDRY_COMMIT = "8c8dd48f72168c5d51e2f7b151595892a8fba43d"
FOUNDRY_TABLES = {
    "h100L": ("H100-SXM5-80GB", "H100 80GB BF16 (Large Scale, >= 128 GPUs)", None),
    "h100": ("H100-SXM5-80GB", "H100 80GB BF16", None),
    "a100_80": ("A100-SXM4-80GB", "A100 80GB with 1600 Gbps node-node interconnect (RoCE)", 1600),
    "a100_40": ("A100-40GB", "A100 40GB with 1600 Gbps node-node interconnect (RoCE)", 1600),
}
# scripts/train/yamls/pretrain/mpt-<size>.yaml: d_model, n_heads, n_layers (expansion_ratio 4, vocab 50368).
MPT = {"125m": (768, 12, 12), "350m": (1024, 16, 24), "760m": (1536, 12, 24), "1b": (2048, 16, 24),
       "3b": (2560, 20, 32), "7b": (4096, 32, 32), "13b": (5120, 40, 40), "30b": (7168, 56, 48),
       "70b": (8192, 64, 80)}
FOUNDRY_DATA = """
h100L 70b 2048 512 41.25 55.0 408 8 1 4096 1007 amp DEFAULT F 1 64862437376
h100L 70b 2048 256 42.42 56.56 419 8 1 2048 1035 amp DEFAULT F 1 64862437376
h100L 70b 2048 128 43.36 57.81 428 8 1 1024 1058 amp DEFAULT F 1 64862437376
h100L 30b 2048 512 40.27 53.69 398 8 1 4096 2115 amp DEFAULT F 1 29975214080
h100L 30b 2048 256 40.89 54.52 404 8 1 2048 2148 amp DEFAULT F 1 29975214080
h100L 30b 2048 128 41.85 55.8 414 8 1 1024 2199 amp DEFAULT F 1 29975214080
h100L 13b 2048 512 41.12 54.83 406 16 1 8192 4952 amp DEFAULT F 1 12853954560
h100L 13b 2048 256 41.42 55.23 409 16 1 4096 4989 amp DEFAULT F 1 12853954560
h100L 13b 2048 128 42.18 56.24 417 16 1 2048 5080 amp DEFAULT F 1 12853954560
h100L 7b 2048 512 42.2 42.2 417 6 1 3072 9670 amp DEFAULT F 0 6658859008
h100L 7b 2048 256 44.15 44.15 436 6 1 1536 10119 amp DEFAULT F 0 6658859008
h100L 7b 2048 128 45.71 45.71 452 6 1 768 10475 amp DEFAULT F 0 6658859008
h100L 3b 2048 512 39.24 39.24 388 8 1 4096 21664 amp DEFAULT G 0 2651837440
h100L 3b 2048 256 41.25 41.25 408 8 1 2048 22772 amp DEFAULT G 0 2651837440
h100L 3b 2048 128 42.43 42.43 419 8 1 1024 23422 amp DEFAULT G 0 2651837440
h100L 1b 2048 512 36.65 36.65 362 12 1 6144 39837 amp DEFAULT G 0 1315950592
h100L 1b 2048 256 39.15 39.15 387 12 1 3072 42555 amp DEFAULT G 0 1315950592
h100L 1b 2048 128 40.6 40.6 401 12 1 1536 44123 amp DEFAULT G 0 1315950592
h100 70b 2048 64 42.57 56.76 421 8 4 2048 1039 amp DEFAULT F 1 64862437376
h100 70b 2048 32 36.15 48.2 357 2 16 1024 882 amp DEFAULT F 1 64862437376
h100 30b 8192 8 29.92 39.9 296 1 21 168 1384 amp DEFAULT F 1 30019254272
h100 30b 4096 8 35.86 47.81 354 1 21 168 1802 amp DEFAULT F 1 29989894144
h100 30b 2048 32 43.92 58.57 434 14 3 1344 2308 amp DEFAULT F 1 29975214080
h100 30b 2048 16 43.07 57.42 426 10 3 480 2263 amp DEFAULT F 1 29975214080
h100 30b 2048 8 38.11 50.82 377 3 21 504 2002 amp DEFAULT F 1 29975214080
h100 30b 1024 8 38.76 51.68 383 6 21 1008 2084 amp DEFAULT F 1 29967874048
h100 13b 32768 8 31.68 42.24 313 1 3 24 1976 amp DEFAULT F 1 13011240960
h100 13b 16384 8 35.55 47.4 351 3 3 72 2985 amp DEFAULT F 1 12927354880
h100 13b 4096 8 41.6 55.47 411 10 3 240 4717 amp DEFAULT F 1 12864440320
h100 13b 2048 64 39.86 39.86 394 2 1 128 4800 amp DEFAULT F 0 12853954560
h100 13b 2048 32 39.95 39.95 395 2 1 64 4811 amp DEFAULT F 0 12853954560
h100 13b 2048 16 39.58 39.58 391 2 1 32 4767 amp DEFAULT F 0 12853954560
h100 13b 2048 8 39.79 39.79 393 2 1 16 4792 amp DEFAULT F 0 12853954560
h100 13b 1024 8 44.27 59.03 438 40 3 960 5502 amp DEFAULT F 1 12848711680
h100 7b 65536 8 28.59 38.13 282 1 2 16 1956 amp DEFAULT F 1 6918905856
h100 7b 32768 8 30.94 41.25 306 2 2 32 3318 amp DEFAULT F 1 6784688128
h100 7b 8192 8 37.14 49.52 367 8 2 128 6935 amp DEFAULT F 1 6684024832
h100 7b 4096 8 40.42 53.9 399 16 2 256 8611 amp DEFAULT F 1 6667247616
h100 7b 2048 8 46.44 46.44 459 6 1 48 10643 amp DEFAULT F 0 6658859008
h100 7b 1024 8 42.83 57.11 423 64 2 1024 10203 amp DEFAULT F 1 6654664704
h100 3b 65536 8 26.81 35.74 265 1 2 16 3262 amp DEFAULT F 1 2814366720
h100 3b 32768 8 28.84 38.46 285 3 6 144 5873 amp DEFAULT F 1 2730480640
h100 3b 16384 8 36.34 36.34 359 1 6 48 11152 amp DEFAULT F 0 2688537600
h100 3b 8192 8 40.31 40.31 398 3 6 144 16578 amp DEFAULT F 0 2667566080
h100 3b 4096 8 42.31 42.31 418 5 6 240 20964 amp DEFAULT F 0 2657080320
h100 3b 2048 64 40.8 40.8 403 6 3 1152 22525 amp DEFAULT F 0 2651837440
h100 3b 2048 32 41.7 41.7 412 6 3 576 23021 amp DEFAULT F 0 2651837440
h100 3b 2048 16 43.73 43.73 432 10 3 480 24142 amp DEFAULT F 0 2651837440
h100 3b 1024 8 46.2 46.2 457 20 6 960 27046 amp DEFAULT F 0 2649216000
h100 3b 512 8 46.32 46.32 458 40 6 1920 27965 amp DEFAULT F 0 2647905280
h100 1b 65536 8 26.34 35.12 260 1 2 16 5506 amp DEFAULT F 1 1445974016
h100 1b 32768 8 33.54 33.54 331 1 4 32 12025 amp DEFAULT F 0 1378865152
h100 1b 16384 8 35.22 35.22 348 2 4 64 19649 amp DEFAULT F 0 1345310720
h100 1b 8192 8 37.73 37.73 373 3 4 96 29157 amp DEFAULT F 0 1328533504
h100 1b 4096 8 40.26 40.26 398 7 4 224 38535 amp DEFAULT F 0 1320144896
h100 1b 2048 64 40.85 40.85 404 20 1 1280 44402 amp DEFAULT F 0 1315950592
h100 1b 2048 32 41.52 41.52 410 20 1 640 45130 amp DEFAULT F 0 1315950592
h100 1b 2048 16 42.36 42.36 419 20 1 320 46037 amp DEFAULT F 0 1315950592
h100 1b 2048 8 41.82 41.82 413 14 1 112 45455 amp DEFAULT F 0 1315950592
h100 1b 1024 8 41.95 41.95 415 18 4 576 48910 amp DEFAULT F 0 1313853440
h100 1b 512 8 43.21 43.21 427 56 4 1792 52275 amp DEFAULT F 0 1312804864
h100 760m 32768 8 31.84 31.84 315 1 2 16 16291 amp DEFAULT F 0 807656448
h100 760m 16384 8 33.57 33.57 332 3 2 48 27815 amp DEFAULT F 0 782490624
h100 760m 8192 8 34.84 34.84 344 6 2 96 41825 amp DEFAULT F 0 769907712
h100 760m 4096 8 35.83 35.83 354 12 2 192 55459 amp DEFAULT F 0 763616256
h100 760m 2048 32 37.57 37.57 371 24 1 768 67971 amp DEFAULT F 0 760470528
h100 760m 2048 16 37.89 37.89 374 24 1 384 68551 amp DEFAULT F 0 760470528
h100 760m 2048 8 34.9 34.9 345 24 2 384 63147 amp DEFAULT F 0 760470528
h100 760m 1024 8 39.76 39.76 393 48 2 768 78581 amp DEFAULT F 0 758897664
h100 760m 512 8 40.42 40.42 399 96 2 1536 83749 amp DEFAULT F 0 758111232
a100_80 70b 2048 64 53.33 71.1 166 8 4 2048 410 bf16 PURE F 1 64862437376
a100_80 70b 2048 32 48.56 64.75 151 2 16 1024 373 bf16 PURE F 1 64862437376
a100_80 30b 8192 8 39.38 52.5 122 1 21 168 574 amp DEFAULT F 1 30019254272
a100_80 30b 4096 8 51.37 68.49 160 1 21 168 814 amp DEFAULT F 1 29989894144
a100_80 30b 2048 8 55.3 73.74 172 3 21 504 916 amp DEFAULT F 1 29975214080
a100_80 30b 1024 8 55.82 74.43 174 6 21 1008 946 amp DEFAULT F 1 29967874048
a100_80 30b 512 8 56.4 75.2 175 12 21 2016 967 amp DEFAULT F 1 29964204032
a100_80 13b 32768 8 51.69 68.92 161 1 3 24 1016 amp DEFAULT F 1 13011240960
a100_80 13b 16384 8 54.07 72.1 168 3 3 72 1431 amp DEFAULT F 1 12927354880
a100_80 13b 8192 8 56.07 74.76 174 5 3 120 1795 amp DEFAULT F 1 12885411840
a100_80 13b 4096 8 57.62 76.82 179 10 3 240 2060 amp DEFAULT F 1 12864440320
a100_80 13b 2048 8 59.57 59.57 185 2 3 48 2262 amp DEFAULT F 0 12853954560
a100_80 13b 1024 8 59.48 79.3 185 40 3 960 2330 amp DEFAULT F 1 12848711680
a100_80 7b 65536 8 46.97 62.63 146 1 2 16 1013 amp DEFAULT F 1 6918905856
a100_80 7b 32768 8 49.46 65.94 154 2 2 32 1672 amp DEFAULT F 1 6784688128
a100_80 7b 16384 8 51.96 69.28 162 4 2 64 2453 amp DEFAULT F 1 6717579264
a100_80 7b 8192 8 54.47 72.62 169 8 2 128 3206 amp DEFAULT F 1 6684024832
a100_80 7b 4096 8 54.84 73.12 171 16 2 256 3684 amp DEFAULT F 1 6667247616
a100_80 7b 2048 8 64.23 64.23 200 6 2 96 4641 amp DEFAULT F 0 6658859008
a100_80 7b 1024 8 58.01 77.35 180 64 2 1024 4357 amp DEFAULT F 1 6654664704
a100_80 3b 65536 8 46.05 61.41 143 1 2 16 1767 amp DEFAULT F 1 2814366720
a100_80 3b 32768 8 47.18 62.91 147 3 6 144 3029 amp DEFAULT F 1 2730480640
a100_80 3b 16384 8 57.13 57.13 178 1 6 48 5529 amp DEFAULT F 0 2688537600
a100_80 3b 8192 8 59.34 59.34 185 3 6 144 7695 amp DEFAULT F 0 2667566080
a100_80 3b 4096 8 60.53 60.53 188 5 6 240 9457 amp DEFAULT F 0 2657080320
a100_80 3b 2048 8 62.11 62.11 193 10 2 160 10811 amp DEFAULT F 0 2651837440
a100_80 3b 1024 8 62.73 62.73 195 20 6 960 11580 amp DEFAULT F 0 2649216000
a100_80 3b 512 8 63.71 63.71 198 40 6 1920 12127 amp DEFAULT F 0 2647905280
a100_80 1b 65536 8 46.18 61.57 144 1 2 16 3044 amp DEFAULT F 1 1445974016
a100_80 1b 32768 8 55.52 55.52 173 1 4 32 6275 amp DEFAULT F 0 1378865152
a100_80 1b 16384 8 56.6 56.6 176 2 4 64 9956 amp DEFAULT F 0 1345310720
a100_80 1b 8192 8 56.69 56.69 176 3 4 96 13814 amp DEFAULT F 0 1328533504
a100_80 1b 4096 8 59.0 59.0 184 7 4 224 17807 amp DEFAULT F 0 1320144896
a100_80 1b 2048 8 59.86 59.86 186 14 4 448 20513 amp DEFAULT F 0 1315950592
a100_80 1b 1024 8 60.15 60.15 187 18 4 576 22112 amp DEFAULT F 0 1313853440
a100_80 1b 512 8 60.68 60.68 189 56 4 1792 23148 amp DEFAULT F 0 1312804864
a100_80 760m 65536 8 45.34 60.45 141 1 2 16 4143 amp DEFAULT F 1 857988096
a100_80 760m 32768 8 54.57 54.57 170 1 2 16 8802 amp DEFAULT F 0 807656448
a100_80 760m 16384 8 54.64 54.64 170 3 2 48 14274 amp DEFAULT F 0 782490624
a100_80 760m 8192 8 55.31 55.31 172 6 2 96 20933 amp DEFAULT F 0 769907712
a100_80 760m 4096 8 56.05 56.05 174 12 2 192 27351 amp DEFAULT F 0 763616256
a100_80 760m 2048 8 56.85 56.85 177 24 2 384 32434 amp DEFAULT F 0 760470528
a100_80 760m 1024 8 47.76 47.76 149 48 2 768 29765 amp DEFAULT F 0 758897664
a100_80 760m 512 8 45.07 45.07 140 96 2 1536 29446 amp DEFAULT F 0 758111232
a100_80 350m 65536 8 52.7 52.7 164 1 2 16 7524 amp DEFAULT F 0 420997120
a100_80 350m 32768 8 52.46 52.46 163 2 2 32 13652 amp DEFAULT F 0 387442688
a100_80 350m 16384 8 53.28 53.28 166 4 2 64 23559 amp DEFAULT F 0 370665472
a100_80 350m 8192 8 53.8 53.8 167 8 2 128 36569 amp DEFAULT F 0 362276864
a100_80 350m 4096 8 53.31 53.31 166 16 2 256 49555 amp DEFAULT F 0 358082560
a100_80 350m 2048 8 51.62 51.62 161 32 2 512 58782 amp DEFAULT F 0 355985408
a100_80 350m 1024 8 50.51 50.51 157 64 2 1024 64813 amp DEFAULT F 0 354936832
a100_80 350m 512 8 50.61 50.61 157 128 2 2048 69330 amp DEFAULT F 0 354412544
a100_80 125m 65536 8 54.13 54.13 168 1 2 16 20368 amp DEFAULT F 0 174070272
a100_80 125m 32768 8 52.71 52.71 164 2 2 32 36407 amp DEFAULT F 0 148904448
a100_80 125m 16384 8 50.61 50.61 157 4 2 64 60040 amp DEFAULT F 0 136321536
a100_80 125m 8192 8 48.85 48.85 152 8 2 128 90392 amp DEFAULT F 0 130030080
a100_80 125m 4096 8 46.08 46.08 143 16 2 256 118396 amp DEFAULT F 0 126884352
a100_80 125m 2048 8 44.79 44.79 139 40 2 640 142830 amp DEFAULT F 0 125311488
a100_80 125m 2048 8 44.45 44.45 138 32 2 512 141737 amp DEFAULT F 0 125311488
a100_80 125m 1024 8 43.15 43.15 134 64 2 1024 156468 amp DEFAULT F 0 124525056
a100_80 125m 512 8 42.56 42.56 132 128 2 2048 165681 amp DEFAULT F 0 124131840
a100_40 70b 2048 128 48.91 65.21 152 4 1 512 376 bf16 PURE F 1 64862437376
a100_40 70b 2048 64 35.87 47.82 111 2 1 128 276 bf16 PURE F 1 64862437376
a100_40 30b 2048 128 52.25 69.66 163 6 1 768 865 bf16 PURE F 1 29975214080
a100_40 30b 2048 32 51.74 68.98 161 4 1 128 857 bf16 PURE F 1 29975214080
a100_40 13b 8192 8 43.95 58.6 137 1 16 128 1407 bf16 PURE F 1 12885411840
a100_40 13b 4096 8 44.85 59.8 139 2 16 256 1603 bf16 PURE F 1 12864440320
a100_40 13b 2048 128 51.93 69.24 162 16 1 2048 1972 bf16 PURE F 1 12853954560
a100_40 13b 2048 64 52.04 69.39 162 16 1 1024 1976 bf16 PURE F 1 12853954560
a100_40 13b 2048 32 52.62 70.16 164 14 1 448 1998 bf16 PURE F 1 12853954560
a100_40 13b 2048 16 52.5 70.0 163 10 1 160 1993 bf16 PURE F 1 12853954560
a100_40 13b 2048 8 43.94 58.58 137 4 16 512 1668 bf16 PURE F 1 12853954560
a100_40 13b 1024 8 44.07 58.76 137 8 16 1024 1727 bf16 PURE F 1 12848711680
a100_40 13b 512 8 44.28 59.04 138 16 16 2048 1763 bf16 PURE F 1 12846090240
a100_40 7b 16384 8 47.65 63.53 148 1 4 32 2249 bf16 PURE F 1 6717579264
a100_40 7b 8192 8 49.04 65.38 153 3 4 96 2887 bf16 PURE F 1 6684024832
a100_40 7b 4096 8 50.11 66.82 156 6 4 192 3366 bf16 PURE F 1 6667247616
a100_40 7b 2048 128 50.14 66.85 156 18 1 2304 3623 bf16 PURE F 1 6658859008
a100_40 7b 2048 64 50.73 67.64 158 18 1 1152 3665 bf16 PURE F 1 6658859008
a100_40 7b 2048 32 51.55 68.73 160 18 1 576 3725 bf16 PURE F 1 6658859008
a100_40 7b 2048 16 50.44 67.26 157 16 1 256 3645 bf16 PURE F 1 6658859008
a100_40 7b 2048 8 50.92 67.89 158 12 4 384 3679 bf16 PURE F 1 6658859008
a100_40 7b 1024 8 51.31 68.42 160 24 4 768 3854 bf16 PURE F 1 6654664704
a100_40 7b 512 8 50.85 67.8 158 48 4 1536 3895 bf16 PURE F 1 6652567552
a100_40 3b 32768 8 46.03 61.37 143 1 4 32 2955 bf16 PURE F 1 2730480640
a100_40 3b 16384 8 46.14 61.52 143 2 8 128 4465 bf16 PURE F 1 2688537600
a100_40 3b 8192 8 55.13 55.13 172 1 8 64 7149 bf16 PURE F 0 2667566080
a100_40 3b 4096 8 56.18 56.18 175 2 8 128 8777 bf16 PURE F 0 2657080320
a100_40 3b 2048 128 54.8 54.8 170 6 1 768 9538 bf16 PURE F 0 2651837440
a100_40 3b 2048 64 55.94 55.94 174 6 1 384 9736 bf16 PURE F 0 2651837440
a100_40 3b 2048 32 56.96 56.96 177 6 1 192 9914 bf16 PURE F 0 2651837440
a100_40 3b 2048 16 56.02 56.02 174 5 1 80 9750 bf16 PURE F 0 2651837440
a100_40 3b 2048 8 57.82 57.82 180 5 8 320 10065 bf16 PURE F 0 2651837440
a100_40 3b 1024 8 58.14 58.14 181 10 8 640 10731 bf16 PURE F 0 2649216000
a100_40 3b 512 8 59.49 59.49 185 20 8 1280 11324 bf16 PURE F 0 2647905280
a100_40 1b 32768 8 45.07 60.1 140 1 4 32 5095 bf16 PURE F 1 1378865152
a100_40 1b 16384 8 55.23 55.23 172 1 8 64 9715 bf16 PURE F 0 1345310720
a100_40 1b 8192 8 55.29 55.29 172 2 8 128 13474 bf16 PURE F 0 1328533504
a100_40 1b 4096 8 55.85 55.85 174 4 8 256 16856 bf16 PURE F 0 1320144896
a100_40 1b 2048 128 54.41 54.41 169 10 1 1280 18647 bf16 PURE F 0 1315950592
a100_40 1b 2048 64 55.44 55.44 172 10 1 640 19001 bf16 PURE F 0 1315950592
a100_40 1b 2048 32 45.39 45.39 141 10 1 320 15555 bf16 PURE F 0 1315950592
a100_40 1b 2048 16 55.69 55.69 173 8 1 128 19085 bf16 PURE F 0 1315950592
a100_40 1b 2048 8 56.23 56.23 175 8 8 512 19271 bf16 PURE F 0 1315950592
a100_40 1b 1024 8 57.02 57.02 177 16 8 1024 20959 bf16 PURE F 0 1313853440
a100_40 1b 512 8 57.1 57.1 178 32 8 2048 21782 bf16 PURE F 0 1312804864
a100_40 760m 32768 8 44.53 59.37 138 1 4 32 7183 bf16 PURE F 1 807656448
a100_40 760m 16384 8 53.26 53.26 166 1 4 32 13914 bf16 PURE F 0 782490624
a100_40 760m 8192 8 53.12 53.12 165 3 4 96 20106 bf16 PURE F 0 769907712
a100_40 760m 4096 8 53.0 53.0 165 6 4 192 25863 bf16 PURE F 0 763616256
a100_40 760m 2048 128 50.73 50.73 158 12 1 1536 28940 bf16 PURE F 0 760470528
a100_40 760m 2048 64 51.44 51.44 160 12 1 768 29344 bf16 PURE F 0 760470528
a100_40 760m 2048 32 51.97 51.97 162 12 1 384 29648 bf16 PURE F 0 760470528
a100_40 760m 2048 16 51.9 51.9 161 12 1 192 29607 bf16 PURE F 0 760470528
a100_40 760m 2048 8 52.89 52.89 165 12 4 384 30173 bf16 PURE F 0 760470528
a100_40 760m 1024 8 53.63 53.63 167 24 4 768 33422 bf16 PURE F 0 758897664
a100_40 760m 512 8 53.47 53.47 166 48 4 1536 34938 bf16 PURE F 0 758111232
a100_40 350m 32768 8 51.55 51.55 160 1 4 32 13416 bf16 PURE F 0 387442688
a100_40 350m 16384 8 51.78 51.78 161 2 4 64 22896 bf16 PURE F 0 370665472
a100_40 350m 8192 8 51.39 51.39 160 4 4 128 34933 bf16 PURE F 0 362276864
a100_40 350m 4096 8 50.38 50.38 157 8 4 256 46833 bf16 PURE F 0 358082560
a100_40 350m 2048 128 45.61 45.61 142 18 1 2304 51934 bf16 PURE F 0 355985408
a100_40 350m 2048 64 46.27 46.27 144 18 1 1152 52689 bf16 PURE F 0 355985408
a100_40 350m 2048 32 47.26 47.26 147 18 1 576 53811 bf16 PURE F 0 355985408
a100_40 350m 2048 16 48.66 48.66 151 18 1 288 55413 bf16 PURE F 0 355985408
a100_40 350m 2048 8 49.17 49.17 153 16 4 512 55995 bf16 PURE F 0 355985408
a100_40 350m 1024 8 48.73 48.73 152 32 4 1024 62523 bf16 PURE F 0 354936832
a100_40 350m 512 8 48.39 48.39 150 64 4 2048 66284 bf16 PURE F 0 354412544
a100_40 125m 32768 8 47.27 47.27 147 1 4 32 32651 bf16 PURE F 0 148904448
a100_40 125m 16384 8 46.77 46.77 145 2 3 48 55484 bf16 PURE F 0 136321536
a100_40 125m 8192 8 46.94 46.94 146 5 3 120 86858 bf16 PURE F 0 130030080
a100_40 125m 4096 8 44.82 44.82 139 13 3 312 115162 bf16 PURE F 0 126884352
a100_40 125m 2048 128 38.86 38.86 121 26 1 3328 123936 bf16 PURE F 0 125311488
a100_40 125m 2048 64 39.27 39.27 122 26 1 1664 125234 bf16 PURE F 0 125311488
a100_40 125m 2048 32 39.86 39.86 124 26 1 832 127122 bf16 PURE F 0 125311488
a100_40 125m 2048 16 40.93 40.93 127 26 1 416 130535 bf16 PURE F 0 125311488
a100_40 125m 2048 8 42.75 42.75 133 26 3 624 136334 bf16 PURE F 0 125311488
a100_40 125m 1024 8 40.89 40.89 127 52 3 1248 148289 bf16 PURE F 0 124525056
a100_40 125m 512 8 40.26 40.26 125 104 3 2496 156735 bf16 PURE F 0 124131840
"""


@source("llm-foundry")
def llm_foundry():
    rows = []
    for line in FOUNDRY_DATA.strip().splitlines():
        (tab, size, seq, gpus, mfu, hfu, tflop, mbs, accum, gbs, tpsg, prec, mp, shard, ac,
         params) = line.split()
        gpu, title, nic = FOUNDRY_TABLES[tab]
        d, h, l = MPT[size]
        seq, gpus, mbs, accum, gbs = int(seq), int(gpus), int(mbs), int(accum), int(gbs)
        ckpt = ac == "1"
        cluster = {"gpu": gpu, "gpus": gpus, "gpus_per_node": 8}
        if nic:
            cluster["nic_gbps_per_node"] = nic
        peak = GPUS[gpu]
        note = ("model from scripts/train/yamls/pretrain/mpt-%s.yaml (d_model %d, n_heads %d, n_layers %d, "
                "expansion_ratio 4, vocab 50368) with MPT defaults: GELU MLP, no biases, tied embeddings, "
                "learned positional embeddings (NumParams grows with seq), low_precision_layernorm "
                "(submit_benchmarks.py). attn_impl flash (submit_benchmarks.py default); the FlashAttention "
                "generation per row is not stated. Pure FSDP: no tensor/pipeline parallelism, every GPU is a "
                "data-parallel rank; activation checkpointing wraps whole blocks (recompute full); FSDP issues its "
                "gradient reduce-scatter during the backward (overlap_grad_reduce). " % (size, d, h, l))
        if nic is None:
            note += "The H100 cluster's inter-node fabric is not stated. "
        note += "Precision %s, FSDP mixed_precision %s." % ("amp_bf16" if prec == "amp" else "bf16", mp)
        rows.append(row(
            "llm-foundry-%s-%s-s%d-g%d-mbs%d" % (tab.replace("_", ""), size, seq, gpus, mbs),
            {"arch": "gpt", "name": "MPT-" + size, "layers": l, "hidden": d, "heads": h, "ffn": 4 * d,
             "vocab": 50368, "seq": seq, "params_b": round(int(params) / 1e9, 4)},
            cluster,
            {"tp": 1, "pp": 1, "cp": 1, "dp": gpus, "mbs": mbs, "gbs": gbs, "grad_accum": accum,
             "recompute": "full" if ckpt else "none", "zero": 3 if shard == "F" else 2, "sp": False,
             "flash_attn": True, "overlap_grad_reduce": True, "precision": "bf16",
             "fsdp_mixed_precision": mp},
            {"metric": "tokens_per_s_per_gpu", "value": int(tpsg),
             "also": {"mfu": round(float(mfu) / 100, 4), "hfu": round(float(hfu) / 100, 4),
                      "model_tflops_per_gpu": float(tflop)},
             "flops": "MFU = (6*N + 12*L*d*s) FLOPs per token (non-causal attention, no norm/activation FLOPs) "
                      "x tokens/s over %g TFLOP/s peak; HFU uses 8*N + 16*L*d*s when activation "
                      "checkpointing is on" % peak},
            {"paper": "MosaicML llm-foundry, MPT Training Benchmarks (scripts/train/benchmarking/README.md)",
             "where": "table '%s', row %s seq %d, %d GPUs, micro-batch %d" % (title, size, seq, gpus, mbs),
             "url": "https://github.com/mosaicml/llm-foundry/blob/%s/scripts/train/benchmarking/README.md"
                    % FOUNDRY_COMMIT,
             "note": note},
            "high", "llm-foundry (Composer, PyTorch FSDP)"))
    return rows


# ---------------------------------------------------------------------------
# 2. NVIDIA Megatron-LM README: Megatron-Core r0.8.0 weak scaling on H100
#    (images/model_table.png, GPT 1.7B-462B, 48-6144 GPUs, seq 4096, vocab 131072).
MCORE_COMMIT = "d98e8a64ddf34856e74b24714e3bedb2f5a39553"
MCORE = [  # size, heads, hidden, layers, tp, pp, dp, gpus, batch, tflops/gpu, mfu %, aggregate PFLOP/s
    ("1.7B", 16, 2048, 24, 1, 1, 48, 48, 192, 408.8, 41, 19.6),
    ("7.1B", 32, 4096, 30, 2, 1, 48, 96, 192, 465.9, 47, 44.7),
    ("16B", 48, 6144, 32, 4, 1, 48, 192, 192, 489.1, 49, 93.9),
    ("32B", 56, 7168, 48, 8, 1, 48, 384, 192, 459.6, 46, 176.5),
    ("70B", 64, 8192, 84, 8, 2, 48, 768, 384, 419.7, 42, 322.3),
    ("119B", 80, 10240, 92, 8, 4, 48, 1536, 768, 420.5, 43, 645.9),
    ("177B", 96, 12288, 96, 8, 6, 48, 2304, 1152, 432.8, 44, 997.2),
    ("314B", 128, 16384, 96, 8, 8, 48, 3072, 1536, 474.4, 48, 1457.4),
    ("462B", 144, 18432, 112, 8, 16, 48, 6144, 3072, 459.9, 47, 2825.6),
]


@source("megatron-core-weak-scaling")
def megatron_core():
    rows = []
    for size, a, h, l, t, p, d, n, b, tf, mfu, agg in MCORE:
        rows.append(row(
            "megatron-core-weak-scaling-%s" % size,
            {"arch": "gpt", "layers": l, "hidden": h, "heads": a, "ffn": 4 * h, "vocab": 131072,
             "seq": 4096, "params_b": float(size[:-1])},
            {"gpu": "H100-SXM5-80GB", "gpus": n, "gpus_per_node": 8},
            {"tp": t, "pp": p, "cp": 1, "dp": d, "vpp": 1, "mbs": 1, "gbs": b, "recompute": "none",
             "zero": 1, "sp": t > 1, "flash_attn": True, "overlap_grad_reduce": True,
             "overlap_param_gather": True, "tp_comm_overlap": t > 1, "precision": "bf16"},
            {"metric": "model_tflops_per_gpu", "value": tf,
             "also": {"mfu": mfu / 100, "aggregate_pflops": agg},
             "flops": "Megatron-LM model FLOPs (training.py num_floating_point_operations: GEMMs, "
                      "non-causal attention and logits, no recompute); MFU over 989 TFLOP/s BF16"},
            {"paper": "NVIDIA Megatron-LM README, Performance Benchmarking (Megatron-Core r0.8.0 weak scaling)",
             "where": "images/model_table.png, row %s" % size,
             "url": "https://github.com/NVIDIA/Megatron-LM/blob/%s/images/model_table.png" % MCORE_COMMIT,
             "note": "README states vocab 131072, seq 4096, --overlap-grad-reduce, --overlap-param-gather "
                     "(requires the distributed optimizer: zero 1), --tp-comm-overlap (requires sequence "
                     "parallelism: sp when tp > 1), end-to-end throughput. Not stated, Megatron defaults "
                     "assumed: micro-batch 1, no virtual pipeline (vpp 1), no activation recompute, "
                     "ffn = 4*hidden GELU MLP, TE fused attention. BF16 inferred from MFU = TFLOP/s / 989. "
                     "Cluster fabric not stated."},
            "medium", "Megatron-Core r0.8.0"))
    return rows


# ---------------------------------------------------------------------------
# 3. pytorch/torchtitan docs/performance.md and benchmarks/ (FSDP2, FSDP+TP;
#    Llama 2/3 on A100-80GB and on Meta's Grand Teton H100 96GB HBM2e at 500 W).
#    BF16 rows only (the Float8 rows are left out).
TT_REPO = "https://github.com/pytorch/torchtitan/blob/%s/%s"
LLAMA = {  # name: (layers, hidden, heads, kv_heads, ffn, vocab), from torchtitan/models/llama/__init__.py
    "llama2-13B": (40, 5120, 40, 40, 13824, 32000),
    "llama2-70B": (80, 8192, 64, 8, 28672, 32000),
    "llama3-8B": (32, 4096, 32, 8, 14336, 128256),
    "llama3-70B": (80, 8192, 64, 8, 28672, 128256),
    "llama3-405B": (126, 16384, 128, 8, 53248, 128256),
}
# Grand Teton H100: 96 GB HBM2e at 2.4 TB/s, 500 W, 400 Gb/s RDMA per GPU (docs/performance.md, Jan 2025).
# intra_node_gbps: H100 SXM NVLink 4, 900 GB/s bidirectional = 450 GB/s per direction (NVIDIA data sheet; the
# doc only says "fully connected with NVLink"); inter_node_gbps: 400 Gb/s per GPU / 8 = 50 GB/s per direction.
# power_w: the doc's 500 W; rated_power_w: the H100 SXM5's 700 W, at which
# the peak_tflops given (the SXM figure the doc's MFU uses) holds.
GRAND_TETON = {"gpu": "H100-SXM5-96GB-HBM2e-500W", "peak_tflops": 989.0, "hbm_gb": 96, "hbm_gbs": 2400,
               "intra_node_gbps": 450, "inter_node_gbps": 50, "gpus_per_node": 8, "nic_gbps_per_node": 3200,
               "power_w": 500, "rated_power_w": 700}
TT_FLOPS = ("torchtitan get_num_flop_per_token: 6*N (N without the embedding) + 12*L*H*Dh*T per token "
            "(non-causal attention, no recompute); MFU over the GPU's listed peak")
TITAN = [
    # id, model, seq, gpus, gpu, tp, lbs, recompute, compile, tps/gpu, mfu or None, commit, path, where, extra note
    ("a100-llama3-8B-sac-layer", "llama3-8B", 8192, 64, "A100", 1, 1, "selective", False, 2904, 0.568,
     "157a12c562288b3bccb077003a97f18a4ca657aa", "docs/performance.md", "Llama 3 table, row 8B selective layer",
     "selective layer AC = checkpoint every other block (selective_ac_option int)"),
    ("a100-llama3-8B-sac-op", "llama3-8B", 8192, 64, "A100", 1, 1, "selective", False, 2973, 0.582,
     "157a12c562288b3bccb077003a97f18a4ca657aa", "docs/performance.md", "Llama 3 table, row 8B selective op",
     "selective op AC = torchtitan's op-level policy (matmul outputs kept, the rest recomputed)"),
    ("a100-llama3-70B-full", "llama3-70B", 8192, 64, "A100", 1, 1, "full", False, 331, 0.517,
     "157a12c562288b3bccb077003a97f18a4ca657aa", "docs/performance.md", "Llama 3 table, row 70B full", ""),
    ("a100-llama2-13B-noac", "llama2-13B", 4096, 64, "A100", 1, 2, "none", False, 2162, 0.611,
     "157a12c562288b3bccb077003a97f18a4ca657aa", "docs/performance.md", "Llama 2 table, row 13B no AC", ""),
    ("a100-llama2-13B-sac-layer", "llama2-13B", 4096, 64, "A100", 1, 2, "selective", False, 1914, 0.541,
     "157a12c562288b3bccb077003a97f18a4ca657aa", "docs/performance.md", "Llama 2 table, row 13B selective layer",
     "selective layer AC = checkpoint every other block"),
    ("a100-llama2-13B-sac-op", "llama2-13B", 4096, 64, "A100", 1, 2, "selective", False, 1904, 0.538,
     "157a12c562288b3bccb077003a97f18a4ca657aa", "docs/performance.md", "Llama 2 table, row 13B selective op",
     "selective op AC"),
    ("a100-llama2-70B-sac-op", "llama2-70B", 4096, 64, "A100", 1, 1, "selective", False, 355, 0.508,
     "157a12c562288b3bccb077003a97f18a4ca657aa", "docs/performance.md", "Llama 2 table, row 70B selective op (batch 1)",
     "selective op AC"),
    ("a100-llama2-70B-full", "llama2-70B", 4096, 64, "A100", 1, 2, "full", False, 353, 0.505,
     "157a12c562288b3bccb077003a97f18a4ca657aa", "docs/performance.md", "Llama 2 table, row 70B full (batch 2)", ""),
    ("h100-llama3-405B-2d", "llama3-405B", 8192, 128, "GT", 8, 2, "full", None, 109, 0.290,
     "3faaa1a0dee68ce028400e3dafd1735d152cb4f8", "docs/performance.md",
     "Llama 3.1 table, row 405B, Optimizations None (FSDP 16 x TP 8)",
     "the doc names the GPU 'H100 (94GB memory)' / 'HBM2e based lower TDP SXM H100(95GB)'; the platform figures "
     "(96 GB, 2.4 TB/s, 500 W, 400 Gb/s per GPU) are from the Jan 2025 version of the same doc. The MFU uses the "
     "SXM peak, which the doc says is above this part's real peak. Whether torch.compile was on is not stated "
     "(train_configs/llama3_405b.toml at that commit sets compile = true)"),
    ("h100-llama3-8B-fsdp-g8", "llama3-8B", 8192, 8, "GT", 1, 2, "selective", False, 5762, None,
     "d4c86e3758a84cf23e2e879ab3c995cba9d5e410", "docs/performance.md", "Table 1, row FSDP", "selective op AC"),
    ("h100-llama3-8B-fsdp-compile-g8", "llama3-8B", 8192, 8, "GT", 1, 2, "selective", True, 6667, None,
     "d4c86e3758a84cf23e2e879ab3c995cba9d5e410", "docs/performance.md", "Table 1, row FSDP + torch.compile",
     "selective op AC"),
    ("h100-llama3-8B-fsdp-g128", "llama3-8B", 8192, 128, "GT", 1, 2, "selective", False, 5605, None,
     "d4c86e3758a84cf23e2e879ab3c995cba9d5e410", "docs/performance.md", "Table 3, row FSDP", "selective op AC"),
    ("h100-llama3-8B-fsdp-compile-g128", "llama3-8B", 8192, 128, "GT", 1, 2, "selective", True, 6514, None,
     "d4c86e3758a84cf23e2e879ab3c995cba9d5e410", "docs/performance.md", "Table 3, row FSDP + torch.compile",
     "selective op AC"),
    ("h100-llama3-70B-tp8", "llama3-70B", 8192, 256, "GT", 8, 16, "full", True, 597.3, None,
     "2887250bbd9103d0bc997ea2efb3a525b5e5dbc0", "benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md",
     "Llama3 70b on 256 H100s (FSDP 32, TP 8), row None (bfloat16), vanilla TP",
     "the table's tokens/sec are per GPU (torchtitan's TPS)"),
    ("h100-llama3-70B-asynctp8", "llama3-70B", 8192, 256, "GT", 8, 16, "full", True, 652.4, None,
     "2887250bbd9103d0bc997ea2efb3a525b5e5dbc0", "benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md",
     "Llama3 70b on 256 H100s (FSDP 32, TP 8), row None (bfloat16), async TP",
     "async TP overlaps TP communication; the table's tokens/sec are per GPU (torchtitan's TPS)"),
    ("h100-llama3-8B-tp8", "llama3-8B", 8192, 64, "GT", 8, 12, "selective", True, 4378, None,
     "2887250bbd9103d0bc997ea2efb3a525b5e5dbc0", "benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md",
     "Llama3 8b on 64 H100s (FSDP 8, TP 8), row None (bfloat16), vanilla TP",
     "per-op selective AC; the table's tokens/sec are per GPU (torchtitan's TPS)"),
    ("h100-llama3-8B-asynctp8", "llama3-8B", 8192, 64, "GT", 8, 12, "selective", True, 4809.4, None,
     "2887250bbd9103d0bc997ea2efb3a525b5e5dbc0", "benchmarks/asyncTP_llama3_h100_2025-06_torchtitan.md",
     "Llama3 8b on 64 H100s (FSDP 8, TP 8), row None (bfloat16), async TP",
     "per-op selective AC; async TP; the table's tokens/sec are per GPU (torchtitan's TPS)"),
]


@source("torchtitan")
def torchtitan():
    rows = []
    for (rid, mname, seq, gpus, gpu, tp, lbs, rc, comp, tps, mfu, commit, path, where, extra) in TITAN:
        l, h, a, kv, ffn, vocab = LLAMA[mname]
        dp = gpus // tp
        cluster = ({"gpu": "A100-SXM4-80GB", "gpus": gpus, "gpus_per_node": 8} if gpu == "A100"
                   else dict(GRAND_TETON, gpus=gpus))
        note = ("seq_len, local batch and parallelism from the cited text and %s%s.toml at the cited "
                "commit; WPS/TPS is tokens per second per GPU (train.py divides by the non-data-parallel size). "
                "FSDP2 (fully_shard, parameters resharded after forward: zero 3); attention is PyTorch SDPA "
                "(flash backend). " % ("torchtitan/models/llama3/train_configs/" if path.startswith("benchmarks")
                                       else "train_configs/", mname.replace("-", "_").replace("B", "b").lower()))
        if gpu == "A100":
            note += "The A100 cluster's fabric is not stated. "
        else:
            note += ("Grand Teton: 96 GB HBM2e at 2.4 TB/s, 500 W, 400 Gb/s RDMA per GPU (docs/performance.md, "
                     "Jan 2025); the NVLink bandwidth is not stated (H100 SXM's 450 GB/s per direction assumed). ")
        if comp is None:
            pass
        else:
            note += "torch.compile %s. " % ("on" if comp else "off")
        note += extra
        strat = {"tp": tp, "pp": 1, "cp": 1, "dp": dp, "mbs": lbs, "gbs": lbs * dp, "recompute": rc, "zero": 3,
                 "sp": tp > 1, "flash_attn": True, "overlap_grad_reduce": True, "precision": "bf16"}
        if "async" in rid:
            strat["tp_comm_overlap"] = True
        meas = {"metric": "tokens_per_s_per_gpu", "value": tps, "flops": TT_FLOPS}
        if mfu is not None:
            meas["also"] = {"mfu": mfu}
        rows.append(row(
            "torchtitan-" + rid,
            {"arch": "llama", "name": mname, "layers": l, "hidden": h, "heads": a, "kv_heads": kv, "ffn": ffn,
             "vocab": vocab, "seq": seq, "params_b": float(mname.split("-")[1][:-1])},
            cluster, strat, meas,
            {"paper": "PyTorch torchtitan performance results (%s)" % path, "where": where,
             "url": TT_REPO % (commit, path), "note": note.strip()},
            "high" if gpu == "A100" or mfu is None else "medium", "torchtitan (PyTorch FSDP2 / DTensor TP)"))
    return rows


# ---------------------------------------------------------------------------
# 4. vTrain (Bang et al., MICRO 2024) released ground truth: multi-node
#    Megatron-DeepSpeed iteration times on A100, 8 GPUs per node, 800 Gb/s per
#    node (data/ground_truth_multi.csv; configs in config/validation/multi/).
VTRAIN_COMMIT = "f8dda8473a48b373b1d25f51f52d685bff5150c5"
# params_b, gpus, gbs, mbs, hidden, heads, layers, seq, tp, dp, pp, iteration time (ms)
VTRAIN_DATA = """
3.6,64,512,8,3072,32,30,2048,1,64,1,3566.5
3.6,64,512,4,3072,32,30,2048,1,64,1,3638.3
3.6,64,512,8,3072,32,30,2048,2,32,1,3975.2
3.6,64,512,2,3072,32,30,2048,1,64,1,3700.5
3.6,64,512,16,3072,32,30,2048,2,32,1,3937.5
3.6,64,512,4,3072,32,30,2048,2,32,1,4078.2
3.6,64,512,2,3072,32,30,2048,2,32,1,4264.2
3.6,64,512,16,3072,32,30,2048,4,16,1,4492.1
3.6,64,512,32,3072,32,30,2048,4,16,1,4548.2
3.6,64,512,8,3072,32,30,2048,4,16,1,4634.4
3.6,64,512,4,3072,32,30,2048,4,16,1,4764
3.6,64,512,4,3072,32,30,2048,1,32,2,4382.1
3.6,64,512,2,3072,32,30,2048,1,32,2,4034.9
3.6,64,512,2,3072,32,30,2048,4,16,1,6228.3
3.6,64,512,8,3072,32,30,2048,1,32,2,5045.6
3.6,64,512,64,3072,32,30,2048,8,8,1,9838.9
3.6,64,512,32,3072,32,30,2048,8,8,1,4972.3
3.6,64,512,16,3072,32,30,2048,8,8,1,5017.8
3.6,64,512,8,3072,32,30,2048,8,8,1,5178
3.6,64,512,4,3072,32,30,2048,8,8,1,5618
3.6,64,512,2,3072,32,30,2048,8,8,1,8880.9
3.6,64,512,32,3072,32,30,2048,16,4,1,10580.6
3.6,64,512,16,3072,32,30,2048,16,4,1,10719.3
3.6,64,512,8,3072,32,30,2048,16,4,1,10894
3.6,64,512,4,3072,32,30,2048,16,4,1,11960.1
3.6,64,512,2,3072,32,30,2048,16,4,1,13472.2
18.4,256,1024,8,6144,48,40,2048,8,32,1,9603.6
18.4,256,1024,16,6144,48,40,2048,8,32,1,10506.6
18.4,256,1024,4,6144,48,40,2048,8,32,1,9927.6
18.4,256,1024,2,6144,48,40,2048,8,32,1,10453.3
18.4,256,1024,8,6144,48,40,2048,4,32,2,10856.3
18.4,256,1024,4,6144,48,40,2048,4,32,2,10950.4
18.4,256,1024,2,6144,48,40,2048,4,32,2,10031.6
18.4,256,1024,4,6144,48,40,2048,2,32,4,10825
18.4,256,1024,4,6144,48,40,2048,1,32,8,12379
18.4,256,1024,2,6144,48,40,2048,8,16,2,10434.8
18.4,256,1024,2,6144,48,40,2048,8,8,4,10926.4
18.4,256,1024,8,6144,48,40,2048,8,4,8,11026.1
18.4,256,1024,8,6144,48,40,2048,2,16,8,13157.5
18.4,256,1024,2,6144,48,40,2048,16,16,1,20414.8
18.4,256,1024,32,6144,48,40,2048,8,4,8,16241.4
39.1,512,1536,2,8192,64,48,2048,2,32,8,21890.4
39.1,512,1536,2,8192,64,48,2048,4,32,4,13875.5
39.1,512,1536,2,8192,64,48,2048,2,16,16,23747.9
39.1,512,1536,3,8192,64,48,2048,4,32,4,16185.5
39.1,512,1536,4,8192,64,48,2048,4,32,4,15625.6
39.1,512,1536,2,8192,64,48,2048,4,16,8,16070.6
39.1,512,1536,3,8192,64,48,2048,2,32,8,19067.2
39.1,512,1536,3,8192,64,48,2048,4,16,8,17606.1
39.1,512,1536,2,8192,64,48,2048,4,8,16,14529.6
39.1,512,1536,3,8192,64,48,2048,2,16,16,26188.8
39.1,512,1536,4,8192,64,48,2048,4,16,8,17413.6
39.1,512,1536,6,8192,64,48,2048,4,32,4,18532.1
39.1,512,1536,6,8192,64,48,2048,8,32,2,14915.5
39.1,512,1536,8,8192,64,48,2048,8,32,2,15212.8
39.1,512,1536,4,8192,64,48,2048,8,32,2,14757.3
39.1,512,1536,12,8192,64,48,2048,8,32,2,17126.8
39.1,512,1536,3,8192,64,48,2048,8,32,2,14850.4
39.1,512,1536,3,8192,64,48,2048,4,8,16,15023.9
39.1,512,1536,2,8192,64,48,2048,8,32,2,14614
39.1,512,1536,4,8192,64,48,2048,4,8,16,15585.5
39.1,512,1536,2,8192,64,48,2048,8,16,4,14713.4
39.1,512,1536,6,8192,64,48,2048,4,16,8,16087
39.1,512,1536,3,8192,64,48,2048,8,16,4,14833.8
39.1,512,1536,4,8192,64,48,2048,8,16,4,14750.7
39.1,512,1536,6,8192,64,48,2048,8,16,4,15249.4
39.1,512,1536,2,8192,64,48,2048,8,8,8,15001.9
39.1,512,1536,8,8192,64,48,2048,8,16,4,15814.5
39.1,512,1536,3,8192,64,48,2048,8,8,8,15270.7
39.1,512,1536,4,8192,64,48,2048,8,8,8,14967.1
39.1,512,1536,6,8192,64,48,2048,4,8,16,20044.1
39.1,512,1536,6,8192,64,48,2048,8,8,8,15775.3
39.1,512,1536,12,8192,64,48,2048,8,16,4,17182.4
39.1,512,1536,3,8192,64,48,2048,1,32,16,19991
39.1,512,1536,2,8192,64,48,2048,8,4,16,15639.4
39.1,512,1536,6,8192,64,48,2048,2,32,8,23062.9
39.1,512,1536,3,8192,64,48,2048,8,4,16,16360.8
39.1,512,1536,8,8192,64,48,2048,8,8,8,16413.4
39.1,512,1536,4,8192,64,48,2048,8,4,16,15944.5
39.1,512,1536,6,8192,64,48,2048,8,4,16,16232.8
39.1,512,1536,6,8192,64,48,2048,2,16,16,27228.4
39.1,512,1536,12,8192,64,48,2048,8,8,8,17999.5
39.1,512,1536,12,8192,64,48,2048,4,16,8,20614.8
39.1,512,1536,8,8192,64,48,2048,8,4,16,16877.1
39.1,512,1536,12,8192,64,48,2048,8,4,16,18568.3
39.1,512,1536,12,8192,64,48,2048,4,8,16,27810.3
39.1,512,1536,24,8192,64,48,2048,8,8,8,23171.1
39.1,512,1536,24,8192,64,48,2048,8,4,16,24169.9
175,512,1536,2,12288,96,96,2048,4,8,16,54255.9
175,512,1536,3,12288,96,96,2048,4,8,16,55236
175,512,1536,2,12288,96,96,2048,4,4,32,53909.6
175,512,1536,2,12288,96,96,2048,4,4,32,53937.9
175,512,1536,3,12288,96,96,2048,4,4,32,56297.2
175,512,1536,2,12288,96,96,2048,2,8,32,57411.2
175,512,1536,4,12288,96,96,2048,4,8,16,57720
175,512,1536,2,12288,96,96,2048,8,8,8,55109.6
175,512,1536,3,12288,96,96,2048,8,8,8,56176.5
175,512,1536,2,12288,96,96,2048,8,4,16,56315.8
175,512,1536,4,12288,96,96,2048,4,4,32,59333.2
175,512,1536,4,12288,96,96,2048,8,8,8,58240.3
175,512,1536,3,12288,96,96,2048,8,4,16,55677.5
175,512,1536,4,12288,96,96,2048,8,4,16,57504.3
175,512,1536,2,12288,96,96,2048,8,2,32,58555.4
175,512,1536,3,12288,96,96,2048,8,2,32,57324.4
175,512,1536,3,12288,96,96,2048,2,8,32,64296.3
175,512,1536,6,12288,96,96,2048,8,4,16,60519.2
175,512,1536,6,12288,96,96,2048,4,4,32,66632.5
175,512,1536,4,12288,96,96,2048,8,2,32,59147.5
175,512,1536,6,12288,96,96,2048,8,2,32,62636.8
"""


@source("vtrain")
def vtrain():
    rows, seen = [], {}
    for line in VTRAIN_DATA.strip().splitlines():
        f = line.split(",")
        pb = float(f[0])
        gpus, gbs, mbs, h, a, l, seq, tp, dp, pp = (int(x) for x in f[1:11])
        ms = float(f[11])
        key = "vtrain-%gB-tp%d-pp%d-dp%d-mbs%d" % (pb, tp, pp, dp, mbs)
        seen[key] = seen.get(key, 0) + 1
        rid = key if seen[key] == 1 else "%s-rep%d" % (key, seen[key])
        rows.append(row(
            rid,
            {"arch": "gpt", "layers": l, "hidden": h, "heads": a, "ffn": 4 * h, "vocab": 50257, "seq": seq,
             "params_b": pb},
            {"gpu": "A100-SXM4-80GB", "gpus": gpus, "gpus_per_node": 8, "nic_gbps_per_node": 800},
            {"tp": tp, "pp": pp, "cp": 1, "dp": dp, "vpp": 1, "mbs": mbs, "gbs": gbs, "recompute": "full",
             "zero": 0, "sp": False, "flash_attn": False, "pp_schedule": "1f1b", "precision": "fp16"},
            {"metric": "iter_s", "value": round(ms / 1000, 6),
             "flops": "not applicable: measured wall time per iteration (the csv gives milliseconds)"},
            {"paper": "Bang et al. 2024, vTrain: A Simulation Framework for Evaluating Cost-effective and "
                      "Compute-optimal Large Language Model Training (MICRO-57, arXiv 2312.12391), released "
                      "measurements",
             "where": "data/ground_truth_multi.csv, row %gB tp %d dp %d pp %d mbs %d%s"
                      % (pb, tp, dp, pp, mbs, "" if seen[key] == 1 else " (repeated measurement %d)" % seen[key]),
             "url": "https://github.com/VIA-Research/vTrain/blob/%s/data/ground_truth_multi.csv" % VTRAIN_COMMIT,
             "note": "Measured with Megatron-DeepSpeed (data/README.md). From the matching "
                     "config/validation/multi/config_val_*.json: GPU 'A100', 8 GPUs per node, "
                     "inter_node_bandwidth 800 (Gb/s per node), activation checkpointing on (recompute full), "
                     "1F1B pipeline schedule; vTrain models these runs without DDP gradient bucketing "
                     "(use_gradient_bucket false), so whether the gradient all-reduce overlapped the backward "
                     "is not stated (overlap_grad_reduce left unset). Not stated, assumed: A100 80GB "
                     "(the memory size is not given), fp16 mixed precision and no ZeRO (Megatron-DeepSpeed "
                     "example defaults), no fused attention kernel, vocab 50257 (vTrain's GPT default; Megatron "
                     "pads it to a multiple of 128*tp), GELU MLP 4*hidden."},
            "medium", "Megatron-DeepSpeed"))
    return rows


# ---------------------------------------------------------------------------
# 5. NVIDIA Megatron-MoE-ModelZoo (yanring/Megatron-MoE-ModelZoo): Megatron-Core
#    MoE benchmarks on H100 (BF16), Qwen3-235B-A22B and Mixtral-8x22B.
MZ_COMMIT = "e8650517d60d71ab73fc6b3b0388cac4ba435181"
MZ_URL = "https://github.com/yanring/Megatron-MoE-ModelZoo/blob/%s/%%s" % MZ_COMMIT
# model_configs/benchmarking/Qwen3-235B-A22B.yaml: 94 layers, hidden 4096, 64 heads, 4 query groups,
# kv-channels 128, 128 experts top-8, moe-ffn-hidden-size 1536, every layer MoE; Qwen3 vocab 151936.
QWEN3_235B = {"arch": "llama", "name": "Qwen3-235B-A22B", "layers": 94, "hidden": 4096, "heads": 64,
              "kv_heads": 4, "head_dim": 128, "ffn": 12288, "vocab": 151936, "params_b": 235.0,
              "active_params_b": 22.0,
              "moe": {"experts": 128, "topk": 8, "expert_ffn": 1536, "shared_experts": 0, "moe_layers": 94}}
MZ_QWEN = [  # label, dispatcher, tp, ep, pp, vpp, dp, fsdp, mbs, recompute, a2a overlap, step s, TF/GPU, code, notes
    ("xnode-ep32", "deepep", 2, 32, 8, 4, 16, False, 1, "selective", False, 19.7, 245, "moe_dev(f3e6c5)", ""),
    ("xnode-ep32-1f1b-overlap", "deepep", 2, 32, 8, 4, 16, False, 1, "selective", True, 17.6, 276,
     "moe_dev(f3e6c5)", "'+1f1b overlap': EP all-to-all overlapped with compute of the other micro-batch"),
    ("intranode-ep8-fsdp", "deepep", 2, 8, 1, 1, 128, True, 4, "full", False, 17.6, 276, "main(1e057005)",
     "'disable log para norm'; Megatron-FSDP (zero 3)"),
    ("intranode-ep8-a2a-pp32", "alltoall", 2, 8, 32, 3, 4, False, 1, "selective", False, 24.2, 200,
     "main(1e057005)", ""),
    ("intranode-ep8-tp4-pp8", "deepep", 4, 8, 8, 4, 8, False, 1, "none", False, 29.0, 167, "main(1e057005)", ""),
]
MZ_LONG = [(16384, 1, 295, 237), (32768, 2, 335, 277), (65536, 4, 368, 320), (131072, 8, 389, 357)]
MZ_FLOPS = ("Megatron-LM num_floating_point_operations for MoE (routed top-k experts, attention, logits; no "
            "recompute) per GPU per second, at the Megatron-LM commit named in the row")


def mz_row(rid, model, gpus, strat, metric, value, also, where, path, note, conf="high"):
    meas = {"metric": metric, "value": value, "flops": MZ_FLOPS}
    if also:
        meas["also"] = also
    return row("megatron-moe-modelzoo-" + rid, model, {"gpu": "H100-SXM5-80GB", "gpus": gpus, "gpus_per_node": 8,
                                                       "nic_gbps_per_node": 3200},
               strat, meas,
               {"paper": "NVIDIA Megatron-MoE-ModelZoo, %s" % path, "where": where, "url": MZ_URL % path,
                "note": note}, conf, "Megatron-Core (MoE)")


@source("megatron-moe-modelzoo")
def megatron_moe_modelzoo():
    rows = []
    path = "best_practice/qwen3/readme.md"
    for (label, disp, tp, ep, pp, vpp, dp, fsdp, mbs, rc, ovl, step, tf, code, extra) in MZ_QWEN:
        strat = {"tp": tp, "pp": pp, "cp": 1, "dp": dp, "ep": ep, "etp": 1, "vpp": vpp, "mbs": mbs, "gbs": 2048,
                 "recompute": rc, "zero": 3 if fsdp else 1, "sp": True, "flash_attn": True,
                 "overlap_grad_reduce": True, "overlap_param_gather": True, "ep_comm_overlap": ovl,
                 "moe_dispatcher": disp, "precision": "bf16"}
        if rc == "selective":
            # The table's recompute column 'norm, act': Megatron-Core's
            # --recompute-modules layernorm moe_act.
            strat["recompute_modules"] = ["layernorm", "moe_act"]
        note = ("Table 'Performance Results / H100' (256 H100, NVLink 4, InfiniBand 8x50 GB/s = 3200 Gb/s per "
                "node, seq 4096, BF16, GBS 2048). Recompute 'norm, act' = selective recompute of layernorm and "
                "the MoE activation (recompute_modules layernorm, moe_act). Code %s. Distributed optimizer, grad-reduce and param-gather overlap, "
                "sequence parallel, flash attention, expert TP 1 from model_configs/benchmarking/"
                "Qwen3-235B-A22B.yaml. Whether routing was force-balanced or dropless is not stated for this "
                "table. %s" % (code, extra))
        rows.append(mz_row("qwen3-235b-%s" % label, QWEN3_235B | {"seq": 4096}, 256, strat, "iter_s", step,
                           {"model_tflops_per_gpu": tf},
                           "H100 table, row %s (TP %d EP %d PP %d VPP %d DP %d MBS %d)" % (label, tp, ep, pp, vpp,
                                                                                           dp, mbs),
                           path, note.strip()))
    for seq, cp, tf_bal, tf_drop in MZ_LONG:
        dp = 256 // (4 * 8 * cp)
        for bal, tf in (("balanced", tf_bal), ("dropless", tf_drop)):
            strat = {"tp": 4, "pp": 8, "cp": cp, "dp": dp, "ep": 8, "etp": 1, "vpp": 4, "mbs": 1, "gbs": 256,
                     "recompute": "selective", "zero": 1, "sp": True, "flash_attn": True,
                     "overlap_grad_reduce": True, "overlap_param_gather": True, "ep_comm_overlap": False,
                     "moe_dispatcher": "deepep", "moe_force_balance": bal == "balanced", "precision": "bf16",
                     "recompute_modules": ["layernorm", "moe"]}
            note = ("Long Context table: 32 nodes of H100 (256 GPUs), InfiniBand 8x50 GB/s, DeepEP, BF16; the "
                    "command gives PP 8, VPP 4, EP 8, A2A_OVERLAP 0, recompute selective with "
                    "'--recompute-modules layernorm moe' (recompute_modules: the whole MoE layer re-runs), "
                    "optimizer offload off. MBS is not in the command: runtime_configs/benchmarking/runtime.conf "
                    "default for Qwen3-235B-A22B, 1. The table prints TFLOP/s only (%s routing)."
                    % ("forced-balance" if bal == "balanced" else "dropless"))
            rows.append(mz_row("qwen3-235b-long-s%d-cp%d-%s" % (seq, cp, bal), QWEN3_235B | {"seq": seq}, 256,
                               strat, "model_tflops_per_gpu", tf, None,
                               "Long Context table, row SEQ_LEN %d, TP 4, CP %d (%s)" % (seq, cp, bal), path,
                               note))
    # Mixtral-8x22B: best_practice/mixtral/run_mixtral_8x22B.sh comments ("around" N TFLOPS) with the
    # runtime.conf configuration TP 2 PP 8 EP 8 VPP 7 MBS 1 GBS 256 on 16 nodes.
    mix = {"arch": "llama", "name": "Mixtral-8x22B", "layers": 56, "hidden": 6144, "heads": 48, "kv_heads": 8,
           "ffn": 16384, "vocab": 32768, "seq": 4096, "params_b": 141.0,
           "moe": {"experts": 8, "topk": 2, "expert_ffn": 16384, "shared_experts": 0, "moe_layers": 56}}
    for label, bal, tf in (("dropless", False, 445), ("balanced", True, 465)):
        strat = {"tp": 2, "pp": 8, "cp": 1, "dp": 8, "ep": 8, "vpp": 7, "mbs": 1, "gbs": 256,
                 "recompute": "none", "zero": 1, "sp": True, "flash_attn": True, "overlap_grad_reduce": True,
                 "overlap_param_gather": True, "moe_dispatcher": "alltoall", "moe_force_balance": bal,
                 "precision": "bf16"}
        rows.append(mz_row(
            "mixtral-8x22b-%s" % label, mix, 128, strat, "model_tflops_per_gpu", tf, None,
            "comment '%s training ... should be around %d TFLOPS for H100'" % (
                "Dropless" if not bal else "Dropless training with forced balancing", tf),
            "best_practice/mixtral/run_mixtral_8x22B.sh",
            "A rounded figure ('around'). Configuration from runtime_configs/benchmarking/runtime.conf "
            "(Mixtral-8x22B: TP 2, PP 8, EP 8, VPP 7, MBS 1, GBS 256, 16 nodes) and "
            "model_configs/benchmarking/Mixtral-8x22B.yaml (56 layers, hidden 6144, 48 heads, 8 query groups, "
            "ffn 16384, 8 experts top-2, SwiGLU, distributed optimizer, overlap, sequence parallel). No recompute "
            "option is set there (none assumed). Vocabulary from the Mixtral tokenizer the script points at "
            "(32768, assumed). Cluster as in the README's H100 setup (8x50 GB/s IB per node), assumed.",
            "low"))
    return rows


# ---------------------------------------------------------------------------
# 6. NVIDIA NeMo Megatron-Bridge performance summary: GPT-OSS 120B (MoE) on
#    64 DGX-H100 in BF16 (the only BF16 H100 pre-training rows in the tables).
MB_COMMIT = "067f987df03b8355b03192d88d70f1709fedf51a"
GPT_OSS_120B = {"arch": "llama", "name": "gpt-oss-120b", "layers": 36, "hidden": 2880, "heads": 64,
                "kv_heads": 8, "head_dim": 64, "ffn": 2880, "vocab": 201088, "seq": 4096, "params_b": 120.0,
                "sliding_window": 128, "window_layers": 18,
                "moe": {"experts": 128, "topk": 4, "expert_ffn": 2880, "shared_experts": 0, "moe_layers": 36,
                        "expert_bias": True}}
MB_ROWS = [  # release, gbs, mbs, vp, tokens/s/GPU, TF/GPU
    # 25.11 (GBS 512, MBS 4, VP 1, GA 2, 5630 tokens/s/GPU) is left out: GA 2 contradicts
    # GBS / (MBS * DP) = 512 / (4 * 16) = 8, so the run's configuration cannot be determined.
    ("26.02", 1280, 1, None, 5993, 163),
    ("26.02.01", 1280, 1, None, 5984, 163),
    ("26.04", 1280, 1, None, 5810, 158),
    ("26.04.01", 1280, 1, None, 5824, 158),
]


@source("megatron-bridge")
def megatron_bridge():
    rows = []
    for rel, gbs, mbs, vp, tps, tf in MB_ROWS:
        strat = {"tp": 1, "pp": 4, "cp": 1, "dp": 16, "ep": 8, "vpp": vp or 1, "mbs": mbs, "gbs": gbs,
                 "recompute": "selective", "zero": 1, "sp": False, "flash_attn": True, "overlap_grad_reduce": True,
                 "moe_force_balance": True, "precision": "bf16", "recompute_modules": ["layernorm", "moe_act"],
                 "grad_reduce_dtype": "bf16"}
        rows.append(row(
            "megatron-bridge-gpt-oss-120b-h100-%s" % rel.replace(".", "_"),
            GPT_OSS_120B, {"gpu": "H100-SXM5-80GB", "gpus": 64, "gpus_per_node": 8}, strat,
            {"metric": "tokens_per_s_per_gpu", "value": tps, "also": {"model_tflops_per_gpu": tf},
             "flops": "Megatron-Bridge model TFLOP/s/GPU (Megatron-Core MoE FLOP count; no recompute)"},
            {"paper": "NVIDIA NeMo Megatron-Bridge Performance Summary (docs/performance-summary-archive.md)",
             "where": "%s NeMo Container, Pre-Training Performance, GPT OSS 120B, row DGX-H100 BF16" % rel,
             "url": "https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/%s/docs/performance-summary-archive.md"
                    % MB_COMMIT,
             "note": ("Table gives GPUs 64, BF16, GBS, MBS, seq 4096, TP 1, PP 4, CP 1, EP 8%s, FSDP 0. From "
                      "src/megatron/bridge/perf_recipes/gpt_oss/h100/gpt_oss.py (pretrain_64gpu_h100_bf16): "
                      "selective recompute of layernorm and moe_act (recompute_modules=[\"layernorm\", "
                      "\"moe_act\"] in the recipe's H100 BF16 config), forced load balancing "
                      "(moe_router_force_load_balancing; the docs say MoE benchmarks force-balance tokens), "
                      "sequence parallel off. Model shape: Hugging Face GptOssConfig defaults = gpt-oss-120b "
                      "(36 layers, hidden 2880, 64 heads of 64, 8 KV heads, 128 experts top-4, expert ffn 2880, "
                      "vocab 201088; the experts' linear layers carry biases: expert_bias, Megatron-Bridge's "
                      "gpt_oss_bridge.py sets add_bias_linear); half the layers (window_layers 18) attend to a 128-token "
                      "sliding window (sliding_window; HF layer_types, Megatron-Bridge window_size (127, 0) with "
                      "window_attn_skip_freq 2); the attention sinks are not encoded. Distributed optimizer and grad-reduce overlap are Megatron-Bridge "
                      "perf-recipe defaults (assumed). Gradients are reduced in bf16 (grad_reduce_dtype): the "
                      "perf recipes' _benchmark_common sets ddp.grad_reduce_in_fp32 = False. DGX-H100 fabric "
                      "not stated."
                      % (", VP %d" % vp if vp else ", VP n/a"))},
            "medium", "NeMo Megatron-Bridge %s (Megatron-Core)" % rel))
    return rows


# ---------------------------------------------------------------------------
# 7. BigScience BLOOM pre-training throughput search (Megatron-DeepSpeed on
#    Jean Zay, 8x A100 80GB per node, 4 Omni-Path links per node): rows with
#    the corrected TFLOPs formula, from "48 node contenders" onwards.
BS_COMMIT = "9e64edec2ad1fb9263bf39ba616a84ff64b4d947"
# table#, line, hidden, layers, heads, nodes, size, dp, tp, pp, mbs, gbs, sec/it, TFLOPs, date, precision
BLOOM_DATA = """
1 607 14336 72 64 48 181B 4 8 12 1 2048 143.31 112.49 02-21 fp16
1 608 14336 72 64 48 181B 4 8 12 2 2048 134.02 120.29 02-21 fp16
1 609 14336 72 64 48 181B 4 8 12 4 2048 123.69 130.34 02-21 fp16
1 610 14336 72 64 48 181B 4 8 12 8 2048 129.26 124.72 02-21 fp16
2 615 14336 72 64 48 181B 8 8 6 1 2048 139.82 115.31 02-21 fp16
2 616 14336 72 64 48 181B 8 8 6 2 2048 131.02 123.05 02-21 fp16
2 617 14336 72 64 48 181B 8 8 6 4 2048 121.48 132.71 02-21 fp16
3 632 13824 84 64 48 196B 4 8 12 2 2048 143.89 121.45 02-21 fp16
3 633 13824 84 64 48 196B 4 8 12 4 2048 133.12 131.27 02-21 fp16
3 634 13824 84 64 48 196B 8 8 6 2 2048 141.41 123.58 02-21 fp16
3 635 13824 84 64 48 196B 8 8 6 4 2048 130.31 134.11 02-21 fp16
7 686 12288 96 64 48 177B 8 8 6 2 2048 136.73 115.73 02-23 fp16
7 687 12288 96 64 48 177B 8 8 6 4 2048 122.96 128.69 02-23 fp16
8 695 13312 84 64 48 182B 4 8 12 4 2048 125.52 129.29 02-23 fp16
8 696 13312 84 64 48 182B 8 8 6 2 2048 135.55 119.72 02-23 fp16
8 697 13312 84 64 48 182B 8 8 6 4 2048 122.93 132.0 02-23 fp16
9 704 13824 78 64 48 182B 8 8 6 4 2048 121.28 133.93 02-23 fp16
10 711 14336 72 64 48 181B 4 8 12 4 2048 123.79 130.24 02-23 fp16
10 712 14336 72 64 48 181B 8 8 6 4 2048 120.85 133.4 02-23 fp16
11 724 14336 72 16 48 181B 8 8 6 4 2048 121.03 133.2 02-24 fp16
11 725 14336 72 32 48 181B 8 8 6 4 2048 124.01 130.0 02-23 fp16
11 726 14336 72 64 48 181B 8 8 6 4 2048 120.18 134.15 02-23 fp16
11 727 14336 72 112 48 181B 8 8 6 4 2048 138.72 116.21 02-23 fp16
11 728 14336 72 128 48 181B 8 8 6 4 2048 124.89 129.08 02-23 fp16
11 729 14336 72 256 48 181B 8 8 6 4 2048 132.85 121.35 02-24 fp16
12 739 13824 78 96 48 182B 8 8 6 4 2048 124.75 130.21 02-23 fp16
12 740 13824 78 128 48 182B 8 8 6 4 2048 162.72 99.82 02-23 fp16
13 751 13312 84 128 48 182B 8 8 6 4 2048 129.17 125.63 02-23 fp16
14 760 12288 96 96 48 177B 8 8 6 4 2048 145.4 108.83 02-24 fp16
14 761 12288 96 128 48 177B 8 8 6 4 2048 129.42 122.27 02-24 fp16
15 775 14336 72 64 48 181B 8 8 6 4 1568 113.01 109.22 02-25 fp16
15 776 14336 72 64 48 181B 8 8 6 4 2048 114.11 141.27 02-25 fp16
15 777 14336 72 64 48 181B 8 8 6 6 2016 123.57 128.43 02-25 fp16
15 778 14336 72 64 48 181B 4 8 12 4 1568 92.75 133.08 02-25 fp16
15 779 14336 72 64 48 181B 4 8 12 4 2048 117.07 137.7 02-25 fp16
15 780 14336 72 64 48 181B 4 8 12 2 1568 99.93 123.51 02-25 fp16
15 781 14336 72 64 48 181B 4 8 12 2 2048 128.82 125.15 02-25 fp16
16 788 14336 72 64 48 181B 6 8 8 4 2016 113.16 140.24 02-25 fp16
16 789 14336 72 64 48 181B 12 8 4 2 2016 125.52 126.43 02-25 fp16
16 790 14336 72 64 48 181B 12 8 4 4 2016 114.81 138.22 02-25 fp16
16 791 14336 72 64 48 181B 24 8 2 1 2016 145.45 109.11 02-25 fp16
16 792 14336 72 64 48 181B 24 8 2 2 2016 136.13 116.58 02-25 fp16
17 800 14336 72 64 48 181B 8 4 12 4 2048 111.89 144.08 02-25 fp16
17 801 14336 72 64 48 181B 8 4 12 2 2048 110.48 145.92 02-25 fp16
17 802 14336 72 64 48 181B 8 4 12 2 2048 113.54 141.99 02-25 fp16
17 803 14336 72 64 48 181B 16 4 6 4 2048 117.11 137.66 02-25 fp16
17 804 14336 72 64 48 181B 16 4 6 2 2048 111.71 144.31 02-25 fp16
17 805 14336 72 64 48 181B 16 2 12 2 2048 112.5 143.3 02-25 fp16
17 808 14336 72 64 48 181B 8 2 24 1 2048 119.53 134.88 02-25 fp16
17 809 14336 72 64 48 181B 8 2 24 2 2048 122.75 131.33 02-25 fp16
17 810 14336 72 64 48 181B 4 4 24 1 2048 130.6 123.44 02-25 fp16
18 818 12288 96 64 48 177B 8 1 48 1 2048 142.17 111.3 02-25 fp16
19 830 13824 78 64 48 182B 8 4 12 1 2048 148.24 109.57 02-26 fp16
19 831 13824 78 64 48 182B 8 4 12 2 2048 103.51 156.92 02-26 fp16
19 832 13824 78 96 48 182B 8 4 12 2 2048 107.12 151.64 02-26 fp16
19 833 13824 78 128 48 182B 8 4 12 2 2048 147.41 110.19 02-26 fp16
19 834 13824 78 64 48 182B 8 4 12 4 2048 106.72 152.21 02-26 fp16
19 835 13824 78 96 48 182B 8 4 12 4 2048 110.31 147.25 02-26 fp16
19 836 13824 78 128 48 182B 8 4 12 4 2048 153.9 105.54 02-26 fp16
19 837 13824 78 96 48 182B 8 8 6 4 2048 118.12 137.51 02-26 fp16
19 838 13824 78 128 48 182B 8 8 6 4 2048 156.84 103.56 02-26 fp16
20 845 14336 72 64 48 181B 8 4 12 2 2048 110.42 146.0 02-26 fp16
20 846 14336 72 128 48 181B 8 4 12 2 2048 114.02 141.39 02-26 fp16
20 847 14336 72 128 48 181B 8 4 12 4 2048 137.53 117.23 02-26 fp16
20 848 14336 72 64 48 181B 8 8 6 4 2048 113.95 141.47 02-26 fp16
20 849 14336 72 128 48 181B 8 8 6 4 2048 116.06 138.9 02-26 fp16
21 856 13312 84 64 48 182B 8 4 12 2 2048 103.82 156.46 02-26 fp16
21 857 13312 84 64 48 182B 8 4 12 4 2048 113.21 143.34 02-26 fp16
21 858 13312 84 64 48 182B 8 8 6 2 2048 129.61 125.21 02-26 fp16
22 867 13824 78 96 48 182B 8 4 12 2 512 35.77 113.52 02-26 fp16
22 868 13824 78 96 48 182B 8 4 12 2 1024 59.65 136.15 02-26 fp16
22 869 13824 78 96 48 182B 8 4 12 2 1536 83.11 146.59 02-26 fp16
23 881 13824 78 96 48 182B 8 8 6 2 2048 133.57 121.61 02-27 fp16
23 882 13824 78 96 48 182B 8 8 6 4 2048 118.24 137.38 02-27 fp16
23 884 13824 78 96 48 182B 16 4 6 4 2048 115.55 140.57 02-27 fp16
24 891 12288 106 96 48 195B 8 4 12 2 2048 112.69 154.86 02-27 fp16
24 892 12288 106 64 48 195B 8 4 12 2 2048 110.96 157.27 02-27 fp16
25 906 12288 106 64 48 195B 8 4 12 2 2048 116.54 149.75 02-28 bf16
25 907 12288 106 96 48 195B 8 4 12 2 2048 118.79 146.9 02-28 bf16
25 908 12288 106 128 48 195B 8 4 12 2 2048 121.42 143.73 02-28 bf16
25 909 12288 106 96 48 195B 8 4 12 4 2048 120.34 145.01 02-28 bf16
26 919 12288 100 64 48 184B 8 8 6 2 2048 139.72 117.91 02-28 bf16
26 920 12288 100 64 48 184B 8 8 6 4 2048 120.96 136.2 02-28 bf16
27 928 13312 82 64 48 178B 4 8 12 4 2048 111.79 141.76 02-28 bf16
27 929 13312 82 64 48 178B 8 4 12 2 2048 104.45 151.71 02-28 bf16
27 930 13312 82 104 48 178B 8 4 12 2 2048 123.71 128.1 02-28 bf16
27 931 13312 82 128 48 178B 8 4 12 2 2048 108.78 145.68 02-28 bf16
27 932 13312 82 64 48 178B 8 4 12 4 2048 104.82 151.18 02-28 bf16
28 939 13312 94 128 48 203B 8 4 12 2 2048 124.1 146.12 02-28 bf16
29 946 14336 70 64 48 176B 4 8 12 2 2048 121.63 128.92 02-28 bf16
29 947 14336 70 64 48 176B 8 4 12 2 2048 102.03 153.68 02-28 bf16
29 948 14336 70 112 48 176B 8 4 12 2 2048 104.5 150.05 02-28 bf16
29 949 14336 70 128 48 176B 8 4 12 2 2048 105.89 148.08 02-28 bf16
29 950 14336 70 64 48 176B 8 4 12 4 2048 102.27 153.33 02-28 bf16
"""


@source("bigscience-bloom")
def bigscience_bloom():
    rows = []
    for line in BLOOM_DATA.strip().splitlines():
        f = line.split()
        tab, ln, h, l, a, nodes = (int(x) for x in f[:6])
        size = f[6]
        dp, tp, pp, mbs, gbs = (int(x) for x in f[7:12])
        sec, tf, date, prec = float(f[12]), float(f[13]), f[14], f[15]
        rows.append(row(
            "bigscience-bloom-L%d-h%d-a%d-tp%d-pp%d-dp%d-mbs%d-gbs%d-line%d" % (l, h, a, tp, pp, dp, mbs, gbs, ln),
            {"arch": "bloom", "layers": l, "hidden": h, "heads": a, "ffn": 4 * h, "vocab": 250680, "seq": 2048,
             "params_b": float(size[:-1])},
            {"gpu": "A100-SXM4-80GB", "gpus": nodes * 8, "gpus_per_node": 8, "nic_gbps_per_node": 400},
            {"tp": tp, "pp": pp, "cp": 1, "dp": dp, "vpp": 1, "mbs": mbs, "gbs": gbs, "recompute": "full",
             "zero": 1, "sp": False, "flash_attn": False, "pp_schedule": "1f1b", "precision": prec},
            {"metric": "iter_s", "value": sec, "also": {"hw_tflops_per_gpu": tf},
             "flops": "TFLOPs as logged by Megatron-DeepSpeed after bigscience-workshop/Megatron-DeepSpeed PR 251 "
                      "(Narayanan et al. 2021 formula with activation recomputation, i.e. hardware FLOPs)"},
            {"paper": "BigScience tr11-176B-ml chronicles-prequel (BLOOM-176B pre-training topology search)",
             "where": "train/tr11-176B-ml/chronicles-prequel.md, table %d, line %d (%s, NHIDDEN=%d NLAYERS=%d "
                      "NHEADS=%d)" % (tab, ln, date, h, l, a),
             "url": "https://github.com/bigscience-workshop/bigscience/blob/%s/train/tr11-176B-ml/chronicles-prequel.md"
                    % BS_COMMIT,
             "note": "Sec/it is a snapshot of iteration 2 (the document says it can fluctuate a bit). 48 nodes of "
                     "8 A100 80GB on Jean Zay; train/tr11-176B-ml/README.md: 4 Omni-Path links per node "
                     "(100 Gb/s each, the Omni-Path Architecture rate: 400 Gb/s per node). Megatron-DeepSpeed with "
                     "--checkpoint-activations (recompute full), ZeRO stage 1 (the document's ZeRO sharding; "
                     "BF16_Optimizer is its own ZeRO-1), sequence 2048, BLOOM's ALiBi GPT block with GELU 4*hidden, "
                     "tied embeddings; vocab 250680 (README; Megatron pads it to a multiple of 128*tp). %s. "
                     "No fused attention kernel (2022 Megatron-DeepSpeed); DeepSpeed's pipeline engine runs a "
                     "1F1B-style schedule."
                     % ("fp16 (rows before 'Rebalancing layers')" if prec == "fp16" else
                        "bf16 with the new BF16_Optimizer (fp32 gradient accumulation) and "
                        "--pp-partition-method 'type:transformer|embedding' ('Rebalancing layers')")},
            "medium", "Megatron-DeepSpeed (BigScience fork)"))
    return rows


# ---------------------------------------------------------------------------
# 8. BAAI FlagPerf: Megatron-Core v0.6.0 Llama 3 pre-training cases on A100 and
#    H100 (training/nvidia/llama3_*-megatron/README.md; configs alongside).
FP_COMMIT = "1b5a030398ab719e406f77877eb34c9599b17fd2"
FP_URL = "https://github.com/FlagOpen/FlagPerf/blob/%s/%%s" % FP_COMMIT
FLAGPERF = [  # case, gpu, nodes, pp, dp, tp, gbs, tokens/s/GPU, MFU, table
    # The README's "A100" rows (3698.7 tokens/s baseline and the 1x8 ablation table) are left out: the same
    # README's hardware section for them reads "NVIDIA DGX A800(80G)", "NVIDIA_A800-SXM4-80GB", so which part
    # (A100 or A800, NVLink 600 vs 400 GB/s) ran them cannot be determined.
    ("llama3_8B", "H100", 1, 1, 4, 2, 512, 8103, 0.393, "main table, H100 1x8 bf16"),
    ("llama3_8B", "H100", 2, 1, 8, 2, 512, 7914, 0.384, "main table, H100 2x8 bf16"),
    ("llama3_8B", "H100", 55, 1, 220, 2, 1760, 7047, 0.342, "main table, H100 55x8 bf16 (gbs=1760)"),
    ("llama3_70B", "H100", 8, 4, 2, 8, 512, 851, 0.361, "main table, H100 8x8 bf16"),
]


@source("flagperf")
def flagperf():
    rows = []
    for case, gpu, nodes, pp, dp, tp, gbs, tps, mfu, where in FLAGPERF:
        l, h, a, kv, ffn, vocab = LLAMA["llama3-" + case.split("_")[1]]
        path = "training/nvidia/%s-megatron/README.md" % case
        rows.append(row(
            "flagperf-%s-%s-%dx8-pp%d-dp%d-tp%d" % (case.replace("_", "-"), gpu.lower(), nodes, pp, dp, tp),
            {"arch": "llama", "name": case.replace("_", "-"), "layers": l, "hidden": h, "heads": a, "kv_heads": kv,
             "ffn": ffn, "vocab": vocab, "seq": 8192, "params_b": float(case.split("_")[1][:-1])},
            {"gpu": "A100-SXM4-80GB" if gpu == "A100" else "H100-SXM5-80GB", "gpus": nodes * 8, "gpus_per_node": 8},
            {"tp": tp, "pp": pp, "cp": 1, "dp": dp, "vpp": 1, "mbs": 1, "gbs": gbs, "recompute": "none", "zero": 1,
             "sp": True, "flash_attn": True, "overlap_grad_reduce": False, "precision": "bf16"},
            {"metric": "tokens_per_s_per_gpu", "value": tps, "also": {"mfu": mfu},
             "flops": "FlagPerf MFU, 'PaLM paper definition' (6*N + 12*L*H*Q*T per token, non-causal attention, no "
                      "recompute) over theoryflops 312 (A100) / 989 (H100) TFLOP/s"},
            {"paper": "BAAI FlagPerf, %s-megatron case (Megatron-Core v0.6.0)" % case, "where": "%s: %s" % (path, where),
             "url": FP_URL % path,
             "note": "Parallelism from the table's PPxDPyTPz column; micro-batch 1 (config/config_*.py localbs), "
                     "global batch 512 and seq 8192 from training/benchmarks/%s/megatron/pretrain_llama3.sh unless "
                     "the row's fix_hp overrides gbs; --sequence-parallel, --use-distributed-optimizer, "
                     "--use-flash-attn, Transformer Engine, bf16. The README lists 'recompute-activations' "
                     "(Megatron's selective recompute of core attention) among its optimisations but the launch "
                     "script passes no recompute flag; recompute none is taken from the script (with flash "
                     "attention the two differ little). overlap-grad-reduce is not passed (Megatron-Core v0.6.0 "
                     "default off). Llama 3 shape from the script (vocab 128256 from the Llama 3 tokenizer). "
                     "Hardware section: H100 SXM 80GB, InfiniBand 400Gb/s (per NIC or per node not said)." % case},
            "medium", "Megatron-Core v0.6.0 (FlagPerf)"))
    return rows


# ---------------------------------------------------------------------------
# 9. Llama 3 (Dubey et al. 2024) Table 4: 405B pre-training on 8K-16K H100 with
#    4D parallelism, 8K and 128K context (overlaps ../measurements.jsonl).
LLAMA3_PAPER = "Dubey et al. 2024, The Llama 3 Herd of Models (arXiv 2407.21783)"


@source("llama3-405b")
def llama3_405b():
    rows = []
    l, h, a, kv, ffn, vocab = LLAMA["llama3-405B"]
    for i, (gpus, cp, dp, seq, bpd, tf, mfu) in enumerate([(8192, 1, 64, 8192, 32, 430, 0.43),
                                                         (16384, 1, 128, 8192, 16, 400, 0.41),
                                                         (16384, 16, 8, 131072, 16, 380, 0.38)]):
        rows.append(row(
            "llama3-405b-g%d-cp%d-s%d" % (gpus, cp, seq),
            {"arch": "llama", "name": "Llama-3.1-405B", "layers": l, "hidden": h, "heads": a, "kv_heads": kv,
             "ffn": ffn, "vocab": vocab, "seq": seq, "params_b": 405.0},
            {"gpu": "H100-SXM5-80GB", "gpus": gpus, "gpus_per_node": 8, "nic_gbps_per_node": 3200},
            {"tp": 8, "cp": cp, "pp": 16, "dp": dp, "mbs": 1, "gbs": bpd * dp, "recompute": "none", "zero": 2,
             "sp": True, "flash_attn": True, "overlap_grad_reduce": True, "cp_comm": "allgather",
             "pp_schedule": "interleaved 1F1B (virtual stages not stated)", "precision": "bf16"},
            {"metric": "model_tflops_per_gpu", "value": tf, "also": {"mfu": mfu},
             "flops": "Llama 3 BF16 model FLOPs per GPU (no recompute); MFU over 989 TFLOP/s"},
            {"paper": LLAMA3_PAPER, "where": "Table 4, row %d" % (i + 1),
             "url": "https://arxiv.org/abs/2407.21783",
             "note": "Table 4 gives GPUs, TP 8, CP, PP 16, DP, sequence length, batch size per DP group, 16M tokens "
                     "per batch, TFLOPs/GPU and BF16 MFU. Section 3.3: H100 80GB at 700 W, 8 per server, "
                     "400 Gb/s per GPU RoCE; FSDP-style sharding of optimizer state and gradients without "
                     "re-sharding parameters after forward (zero 2); interleaved pipeline schedule with a tuned "
                     "number of micro-batches; context parallelism all-gathers K/V (cp_comm allgather). Not "
                     "stated, assumed: micro-batch 1 (batch size per DP = micro-batches), number of virtual "
                     "stages, activation recompute (none assumed). The same three rows are in "
                     "../measurements.jsonl (llama3-405B-*), where row 1 is a calibration row."},
            "medium", "Meta internal (PyTorch, 4D parallelism)"))
    return rows


# ---------------------------------------------------------------------------
# 10. NVIDIA DGX Cloud Benchmarking recipes v25.01 (NVIDIA/dgxc-benchmarking):
#     NeMo 24.09 / 24.11 BF16 on H100 at 8-2,304 GPUs, with the recipe yamls.
DGXC_COMMIT = "143b90dd91f9be958fed4773ae95d941a3356a82"
DGXC_URL = "https://github.com/NVIDIA/dgxc-benchmarking/blob/%s/%%s" % DGXC_COMMIT
GPT3_175B = {"arch": "gpt", "name": "GPT-3 175B", "layers": 96, "hidden": 12288, "heads": 96, "ffn": 49152,
             "vocab": 50257, "seq": 2048, "params_b": 175.0}
NEMOTRON4_340B = {"arch": "gpt", "name": "Nemotron-4 340B", "layers": 96, "hidden": 18432, "heads": 96,
                  "kv_heads": 8, "ffn": 73728, "vocab": 256000, "seq": 4096, "params_b": 340.0,
                  "tie_embeddings": False}
DGXC = {
    # key: (readme, yaml, model, tp, pp, cp, vp, ga, container, recompute, tp_overlap,
    #       [(gpus, gbs, layers, pp_override, vp_override, step_s, tokens_s, mfu), ...])
    "llama3.1-8b": ("llama3.1/README_8b.md", "llama3.1/llama3.1_8b.yaml", "llama3-8B", 1, 1, 2, None, 32,
                    "24.09", "none", False,
                    [(8, 128, 32, 1, None, 12.91, 81222, 0.5937), (16, 256, 32, 1, None, 13.00, 161319, 0.5896),
                     (32, 512, 32, 1, None, 13.05, 321403, 0.5873), (64, 1024, 32, 1, None, 13.08, 641331, 0.5860),
                     (128, 2048, 32, 1, None, 13.10, 1280704, 0.5851)]),
    "llama3.1-70b": ("llama3.1/README_70b.md", "llama3.1/llama3.1_70b.yaml", "llama3-70B", 4, 4, 2, 5, 64,
                     "24.09", "none", True,
                     [(64, 128, 80, 4, 5, 14.72, 71235, 0.5410), (128, 256, 80, 4, 5, 14.73, 142373, 0.5406),
                      (256, 512, 80, 4, 5, 14.8, 283399, 0.5381), (512, 1024, 80, 4, 5, 14.89, 563372, 0.5348),
                      (1024, 2048, 80, 4, 5, 14.92, 1124478, 0.5338),
                      (2048, 4096, 80, 4, 5, 14.98, 2248957, 0.5338)]),
    "llama3.1-405b": ("llama3.1/README_405b.md", "llama3.1/llama3.1_405b.yaml", "llama3-405B", 8, 9, 2, 7, 63,
                      "24.09", "none", True,
                      [(32, 126, 7, 1, None, 8.85, 116632, 0.5863), (96, 126, 21, 3, 7, 8.75, 117965, 0.5617),
                       (192, 252, 42, 3, 7, 16.93, 121936, 0.5725), (576, 252, 126, 9, 7, 17.20, 120022, 0.5578),
                       (1152, 504, 126, 9, 7, 17.52, 235660, 0.5476),
                       (2304, 1008, 126, 9, 7, 17.62, 468646, 0.5445)]),
    "gpt3-175b": ("nemo_megatron/README_175b.md", "nemo_megatron/gpt3_175b_hydra.yaml", "gpt3", 4, 8, 1, 12, 64,
                  "24.11", "none", True,
                  [(128, 256, 96, 8, 12, 8.91, 58843, 0.4993), (256, 512, 96, 8, 12, 8.95, 117159, 0.4971),
                   (512, 1024, 96, 8, 12, 9.09, 230710, 0.4894), (1024, 2048, 96, 8, 12, 9.01, 465517, 0.4938),
                   (2048, 4096, 96, 8, 12, 9.02, 930001, 0.4932)]),
    "nemotron4-340b": ("nemotron/README_340b.md", "nemotron/nemotron4-340b-synth.yaml", "nemotron4", 8, 8, 1, 12,
                       16, "24.11", "selective", False,
                       [(128, 32, 96, 8, 12, 4.61, 28432, 0.5538), (256, 64, 96, 8, 12, 4.67, 56134, 0.5467),
                        (512, 128, 96, 8, 12, 4.7, 111551, 0.5432), (1024, 256, 96, 8, 12, 4.73, 221686, 0.5398),
                        (2048, 512, 96, 8, 12, 4.84, 433296, 0.5275)]),
}


@source("nvidia-dgxc-benchmarking")
def nvidia_dgxc():
    rows = []
    for key, (readme, yaml, mname, tp, pp0, cp, vp0, ga, cont, rc, tpo, runs) in DGXC.items():
        for gpus, gbs, layers, pp, vp, step, tps, mfu in runs:
            if mname == "gpt3":
                model = dict(GPT3_175B)
            elif mname == "nemotron4":
                model = dict(NEMOTRON4_340B)
            else:
                l, h, a, kv, ffn, vocab = LLAMA[mname]
                model = {"arch": "llama", "name": "Llama-3.1-" + mname.split("-")[1], "layers": l, "hidden": h,
                         "heads": a, "kv_heads": kv, "ffn": ffn, "vocab": vocab, "seq": 8192,
                         "params_b": float(mname.split("-")[1][:-1])}
            proxy = layers != model["layers"]
            model["layers"] = layers
            dp = gpus // (tp * pp * cp)
            assert dp * ga == gbs, (key, gpus)
            strat = {"tp": tp, "pp": pp, "cp": cp, "dp": dp, "vpp": vp or 1, "mbs": 1, "gbs": gbs,
                     "recompute": rc, "zero": 1, "sp": tp > 1, "flash_attn": True, "overlap_grad_reduce": True,
                     "overlap_param_gather": True, "tp_comm_overlap": tpo, "precision": "bf16",
                     # every v25.01 yaml sets optim.grad_sync_dtype: bf16
                     "grad_reduce_dtype": "bf16"}
            if cp > 1:
                strat["cp_comm"] = "ring"
            note = ("Configuration from the table title and %s at the cited commit: micro-batch 1, TP %d, PP %d, "
                    "CP %d, VP %s, gradient accumulation %d, distributed_fused_adam with overlap_grad_sync and "
                    "overlap_param_sync (zero 1) and grad_sync_dtype bf16, sequence_parallel %s, ub_tp_comm_overlap %s, "
                    "use_flash_attention / Transformer Engine, activation checkpointing %s. NeMo %s container, "
                    "BF16 (the recipes' FP8 tables are left out). The step time is the last training step's "
                    "train_step_timing. The H100 cluster's fabric is not stated; context parallelism is Megatron's "
                    "ring (TE) when CP > 1."
                    % (yaml, tp, pp, cp, vp or "n/a", ga, tp > 1, tpo,
                       "selective" if rc == "selective" else "off", cont))
            if proxy:
                note += (" Proxy configuration: the model is cut to %d layers so that it fits on %d GPUs "
                         "(the README's table gives the layer count)." % (layers, gpus))
            if mname == "gpt3":
                note += (" GPT-3 175B with the GPT-2 BPE vocabulary (50257, padded by Megatron to a multiple of "
                         "128*tp), learned absolute positions and tied embeddings (NeMo GPT defaults).")
            if mname == "nemotron4":
                note += (" Nemotron-4 340B: squared-ReLU MLP (not gated), RoPE, untied embeddings, 256k "
                         "sentencepiece vocabulary, GQA with 8 query groups.")
            if key == "llama3.1-405b" and gpus == 96:
                note += " The step-time cell reads '8.7  5'; 8.75 s is the value that gives the row's 117965 tokens/s."
            rows.append(row(
                "nvidia-dgxc-benchmarking-%s-g%d" % (key, gpus), model,
                {"gpu": "H100-SXM5-80GB", "gpus": gpus, "gpus_per_node": 8}, strat,
                {"metric": "iter_s", "value": step, "also": {"tokens_per_s": tps, "mfu": mfu},
                 "flops": "NeMo model FLOPs per global batch from the README's 'model flops for GBS=1' (attention "
                          "included, no recompute); MFU over 989 TFLOP/s BF16"},
                {"paper": "NVIDIA DGX Cloud Benchmarking recipes v25.01 (NVIDIA/dgxc-benchmarking, %s)" % readme,
                 "where": "%s, BF16 table, %d H100 column" % (readme, gpus), "url": DGXC_URL % readme,
                 "note": note},
                "high" if not (key == "llama3.1-405b" and gpus == 96) else "medium",
                "NeMo %s (Megatron-Core)" % cont))
    return rows



# v25.05.04 of the same recipes (NeMo 25.04): BF16 H100 rows whose table configuration is complete.
DGXC2_COMMIT = "1f6d9f40e4117d7c71b726f86074ac01c29f87f5"
DGXC2_URL = "https://github.com/NVIDIA/dgxc-benchmarking/blob/%s/%%s" % DGXC2_COMMIT
NEMO_CFG = ("https://github.com/NVIDIA/NeMo/blob/ea4b47fddcf84b7fedd870e2dbccad0712a15aff/"
            "scripts/performance/recommended_model_configs/model_configs_h100.csv")
DEEPSEEK_V3 = {"arch": "llama", "name": "DeepSeek-V3", "layers": 61, "hidden": 7168, "heads": 128, "kv_heads": 128,
               "head_dim": 128, "ffn": 18432, "vocab": 129280, "seq": 4096, "params_b": 671.0,
               "active_params_b": 37.0,
               "mla": {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_head_dim": 128, "qk_rope_head_dim": 64,
                       "v_head_dim": 128},
               "moe": {"experts": 256, "topk": 8, "expert_ffn": 2048, "shared_experts": 1, "shared_ffn": 2048,
                       "moe_layers": 58}}
GROK1 = {"arch": "llama", "name": "Grok-1", "layers": 64, "hidden": 6144, "heads": 48, "kv_heads": 8,
         "head_dim": 128, "ffn": 32768, "vocab": 131072, "seq": 8192, "params_b": 314.0,
         "moe": {"experts": 8, "topk": 2, "expert_ffn": 32768, "shared_experts": 0, "moe_layers": 64}}
NEMOTRON4_15B = {"arch": "gpt", "name": "Nemotron-4 15B", "layers": 32, "hidden": 6144, "heads": 48, "kv_heads": 8,
                 "ffn": 24576, "vocab": 256000, "seq": 4096, "params_b": 15.0, "tie_embeddings": False}
DGXC2 = [
    # id, readme, model, gpus, tp, pp, cp, ep, vp, mbs, gbs, recompute, step s, tokens/s or None, mfu or None,
    # tflops/gpu or None, nemo, extra note
    ("deepseek-v3-g512", "deepseek_v3/pretraining/README.md", DEEPSEEK_V3, 512, 2, 8, 1, 64, 1, 1, 4096,
     "selective", 48.948, 342755.90, 0.1760, 174.02, "25.04.01",
     "H100 specifications table: TP 2, PP 8, CP 1, EP 64, ETP 1, DP 32, VP 1, MBS 1, GBS 4096, GA 128. "
     "launch.sh for h100: --recompute_modules mla_up_proj (selective), no activation offload. Shape: NeMo "
     "DeepSeekV3Config (61 layers, first 3 dense, hidden 7168, MLA with q_lora 1536 / kv_lora 512, 128 heads, "
     "qk 128+64 rope, v 128; 256 routed experts top-8 of 2048 plus 1 shared of 2048; dense ffn 18432; "
     "mtp_num_layers None); vocab 129280 (DeepSeek-V3 tokenizer). Dispatcher and routing balance not stated."),
    ("deepseek-v3-g1024", "deepseek_v3/pretraining/README.md", DEEPSEEK_V3, 1024, 2, 16, 1, 64, 1, 1, 8192,
     "selective", 52.04, 644781.55, 0.1655, 163.7, "25.04.01",
     "H100 specifications table: TP 2, PP 16, CP 1, EP 64, ETP 1, DP 32, VP 1, MBS 1, GBS 8192, GA 256 (the NeMo "
     "recommended H100 config csv lists the same). Recompute and shape as the 512-GPU row."),
    ("grok1-314b-g512", "grok1/README.md", GROK1, 512, 4, 8, 2, 8, 8, 1, 1024, "none", 15.933, 526493, 0.542,
     None, "25.04.00",
     "H100 table: TP 4, PP 8, CP 2, EP 8, ETP 1, DP 8, VP 8, MBS 1, GBS 1024, GA 128. Shape: xai-org/grok-1 "
     "run.py (64 layers, emb 48*128, 48 query / 8 KV heads of 128, 8 experts top-2, widening factor 8 -> ffn "
     "32768, vocab 131072). Recompute not stated (none assumed: NeMo performance-recipe default)."),
    ("llama3.1-405b-g512", "llama3.1/README.md", "llama3-405B", 512, 8, 8, 2, 1, 8, 1, 256, "none", 19.810,
     105863, 0.5534, None, "25.04.01",
     "H100 table: TP 8, PP 8, CP 2, DP 4, VP 8, MBS 1, GBS 256; the table's GA column says 32, but GBS / (MBS*DP) "
     "= 64 and the README's tokens/s (105863 = 8192*256/19.81) confirms GBS 256. Recompute none (NeMo "
     "recommended H100 config csv: recompute_layers 0)."),
    ("nemotron4-15b-g16", "nemotron/README.md", NEMOTRON4_15B, 16, 2, 1, 1, 1, 1, 2, 64, "none", 2.746, None,
     None, None, "25.04.00",
     "H100 specifications table: TP 2, PP 1, CP 1, DP 8, MBS 2, GBS 64, GA 4. Shape: NeMo Nemotron4Config15B "
     "(32 layers, hidden 6144, ffn 24576 squared-ReLU, 48 heads, 8 query groups, 256k vocabulary). Recompute "
     "none (NeMo recommended H100 config csv)."),
]


TP_OVERLAP_2505 = {"llama3.1-405b-g512", "nemotron4-15b-g16"}


@source("nvidia-dgxc-benchmarking", extend=True)
def nvidia_dgxc_2505():
    rows = []
    for (rid, readme, model, gpus, tp, pp, cp, ep, vp, mbs, gbs, rc, step, tps, mfu, tf, nemo, extra) in DGXC2:
        if isinstance(model, str):
            l, h, a, kv, ffn, vocab = LLAMA[model]
            model = {"arch": "llama", "name": "Llama-3.1-405B", "layers": l, "hidden": h, "heads": a,
                     "kv_heads": kv, "ffn": ffn, "vocab": vocab, "seq": 8192, "params_b": 405.0}
        dp = gpus // (tp * pp * cp)
        strat = {"tp": tp, "pp": pp, "cp": cp, "dp": dp, "vpp": vp, "mbs": mbs, "gbs": gbs, "recompute": rc,
                 "zero": 1, "sp": tp > 1, "flash_attn": True, "overlap_grad_reduce": True,
                 "overlap_param_gather": True, "precision": "bf16"}
        if ep > 1:
            strat["ep"] = ep
            strat["etp"] = 1
        if cp > 1:
            strat["cp_comm"] = "ring"
        # NeMo's performance recipes at the commit of NEMO_CFG add
        # MegatronCommOverlapCallback(tp_comm_overlap=True) for Llama 3.1 405B
        # (recipes/llama31_405b.py, with the h100 tp8/cp2 userbuffers config)
        # and Nemotron-4 15B (recipes/nemotron4_15b.py), and their
        # scripts/performance/llm scripts turn it off only for MXFP8; DeepSeek-V3's
        # recipe sets tp_comm_overlap=False (the default here).
        if rid in TP_OVERLAP_2505:
            strat["tp_comm_overlap"] = True
        # DeepSeek-V3's launch.sh for h100 passes --recompute_modules
        # mla_up_proj (Megatron-Core's recompute_modules; it replaces the
        # default core_attn).
        if rid.startswith("deepseek-v3"):
            strat["recompute_modules"] = ["mla_up_proj"]
        also = {}
        if tps:
            also["tokens_per_s"] = tps
        if mfu:
            also["mfu"] = mfu
        if tf:
            also["model_tflops_per_gpu"] = tf
        meas = {"metric": "iter_s", "value": step,
                "flops": "NeMo model FLOPs (TFLOPS_per_GPU as logged; MFU over 989 TFLOP/s BF16)"}
        if also:
            meas["also"] = also
        rows.append(row(
            "nvidia-dgxc-benchmarking-v250504-%s" % rid, model,
            {"gpu": "H100-SXM5-80GB", "gpus": gpus, "gpus_per_node": 8}, strat, meas,
            {"paper": "NVIDIA DGX Cloud Benchmarking recipes v25.05.04 (NVIDIA/dgxc-benchmarking, %s)" % readme,
             "where": "%s, H100 Performance, BF16 %dx H100" % (readme, gpus), "url": DGXC2_URL % readme,
             "note": ("%s NeMo %s container. Distributed optimizer with grad/param overlap, sequence parallel "
                      "with TP, TE flash attention: NeMo performance-recipe defaults (assumed).%s Step time is the "
                      "mean of iterations 11-44 (parse_train_timing.sh). Fabric not stated. NeMo config csv: %s"
                      % (extra, nemo,
                         " TP communication overlap on: the NeMo recipe's MegatronCommOverlapCallback sets "
                         "tp_comm_overlap=True." if rid in TP_OVERLAP_2505 else "",
                         NEMO_CFG))},
            "medium", "NeMo %s (Megatron-Core)" % nemo))
    return rows


# ---------------------------------------------------------------------------
# Validation.
METRICS = {"iter_s", "tokens_per_s_per_gpu", "tokens_per_s", "model_tflops_per_gpu",
           "hw_tflops_per_gpu", "mfu"}
TOP = {"id", "model", "cluster", "strategy", "measured", "source", "confidence", "framework"}
MODEL = {"arch", "name", "layers", "hidden", "heads", "kv_heads", "head_dim", "ffn", "vocab", "seq",
         "params_b", "active_params_b", "tie_embeddings", "moe", "mla", "sliding_window", "window_layers"}
MLA = {"q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_rope_head_dim", "v_head_dim"}
MOE = {"experts", "topk", "expert_ffn", "shared_experts", "shared_ffn", "moe_layers", "expert_bias"}
CLUSTER = {"gpu", "gpus", "gpus_per_node", "nic_gbps_per_node", "peak_tflops", "hbm_gb", "hbm_gbs",
           "intra_node_gbps", "inter_node_gbps", "power_w", "rated_power_w"}
STRATEGY = {"tp", "pp", "vpp", "cp", "ep", "etp", "dp", "mbs", "gbs", "grad_accum", "recompute", "zero",
            "sp", "flash_attn", "overlap_grad_reduce", "overlap_param_gather", "tp_comm_overlap",
            "cp_comm", "precision", "fsdp_mixed_precision", "grad_reduce_dtype", "pp_schedule", "ep_comm_overlap",
            "recompute_modules",
            "moe_dispatcher", "moe_force_balance"}
SOURCE = {"paper", "where", "url", "note", "slug"}
MEASURED = {"metric", "value", "also", "flops"}
ARCHS = {"gpt", "llama", "bloom", "opt"}


class Bad(Exception):
    pass


# Megatron-Core's TransformerConfig.recompute_modules choices that mofa-predict models.
RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")


def need(cond, where, what):
    if not cond:
        raise Bad("%s: %s" % (where, what))


def pos_int(obj, key, where, required=True):
    if key not in obj:
        need(not required, where, "%s missing" % key)
        return None
    v = obj[key]
    need(isinstance(v, int) and not isinstance(v, bool) and v > 0, where,
         "%s must be a positive integer, got %r" % (key, v))
    return v


def pos_num(obj, key, where, required=True):
    if key not in obj:
        need(not required, where, "%s missing" % key)
        return None
    v = obj[key]
    need(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, where,
         "%s must be a positive number, got %r" % (key, v))
    return v


def text(obj, key, where, required=True):
    if key not in obj:
        need(not required, where, "%s missing" % key)
        return None
    need(isinstance(obj[key], str) and obj[key].strip(), where, "%s must be a non-empty string" % key)
    return obj[key]


def keys(obj, allowed, where):
    need(isinstance(obj, dict), where, "must be an object")
    extra = set(obj) - allowed
    need(not extra, where, "undocumented field(s) %s" % sorted(extra))


def check_row(r, slug, where):
    keys(r, TOP, where)
    rid = text(r, "id", where)
    need(rid.startswith(slug + "-"), where, "id must start with '%s-'" % slug)
    where = "%s (%s)" % (where, rid)
    m = r.get("model")
    need(m is not None, where, "model missing")
    keys(m, MODEL, where + ": model")
    need(m.get("arch") in ARCHS, where, "model.arch must be one of %s" % sorted(ARCHS))
    for k in ("layers", "hidden", "heads", "vocab", "seq"):
        pos_int(m, k, where + ": model")
    heads = m["heads"]
    kv = pos_int(m, "kv_heads", where + ": model", False)
    need(kv is None or heads % kv == 0, where, "model.kv_heads must divide heads")
    pos_int(m, "ffn", where + ": model", False)
    pos_int(m, "head_dim", where + ": model", False)
    pos_num(m, "params_b", where + ": model")
    pos_num(m, "active_params_b", where + ": model", False)
    pos_int(m, "sliding_window", where + ": model", False)
    wl = pos_int(m, "window_layers", where + ": model", False)
    need(wl is None or ("sliding_window" in m and wl <= m["layers"]), where,
         "model.window_layers needs sliding_window and must not exceed layers")
    if "moe" in m:
        keys(m["moe"], MOE, where + ": model.moe")
        e = pos_int(m["moe"], "experts", where + ": model.moe")
        k = pos_int(m["moe"], "topk", where + ": model.moe")
        need(k <= e, where, "moe.topk exceeds experts")
        pos_int(m["moe"], "expert_ffn", where + ": model.moe")
        ml = pos_int(m["moe"], "moe_layers", where + ": model.moe", False)
        need(ml is None or ml <= m["layers"], where, "moe.moe_layers exceeds layers")
        pos_int(m["moe"], "shared_ffn", where + ": model.moe", False)
        need(isinstance(m["moe"].get("shared_experts", 0), int), where, "moe.shared_experts must be an integer")
        need(isinstance(m["moe"].get("expert_bias", False), bool), where, "moe.expert_bias must be true or false")
    if "mla" in m:
        keys(m["mla"], MLA, where + ": model.mla")
        for k in sorted(MLA):
            pos_int(m["mla"], k, where + ": model.mla")
    need(isinstance(m.get("tie_embeddings", False), bool), where, "model.tie_embeddings must be true or false")
    c = r.get("cluster")
    need(c is not None, where, "cluster missing")
    keys(c, CLUSTER, where + ": cluster")
    gpu = text(c, "gpu", where + ": cluster")
    need(gpu in GPUS or all(k in c for k in ("peak_tflops", "hbm_gb", "hbm_gbs")), where,
         "cluster.gpu %r is not one of %s; give peak_tflops, hbm_gb and hbm_gbs" % (gpu, sorted(GPUS)))
    gpus = pos_int(c, "gpus", where + ": cluster")
    gpn = pos_int(c, "gpus_per_node", where + ": cluster", False)
    need(gpn is None or gpus % gpn == 0 or gpus < gpn, where, "cluster.gpus must be whole nodes")
    pos_num(c, "nic_gbps_per_node", where + ": cluster", False)
    for k in ("peak_tflops", "hbm_gb", "hbm_gbs", "intra_node_gbps", "inter_node_gbps", "power_w",
              "rated_power_w"):
        pos_num(c, k, where + ": cluster", False)
    need(("rated_power_w" in c) <= ("power_w" in c), where, "cluster.rated_power_w without power_w")
    need(gpu in GPUS or all(k in c for k in ("intra_node_gbps", "inter_node_gbps")), where,
         "a GPU that is not a preset needs intra_node_gbps and inter_node_gbps too")
    s = r.get("strategy")
    need(s is not None, where, "strategy missing")
    keys(s, STRATEGY, where + ": strategy")
    deg = {}
    for k in ("tp", "pp", "cp", "dp"):
        deg[k] = pos_int(s, k, where + ": strategy", k == "dp")
    for k in ("vpp", "ep", "etp", "grad_accum"):
        pos_int(s, k, where + ": strategy", False)
    prod = 1
    for k in ("tp", "pp", "cp", "dp"):
        prod *= deg[k] or 1
    need(prod == gpus, where, "tp*pp*cp*dp = %d but cluster.gpus = %d" % (prod, gpus))
    mbs = pos_int(s, "mbs", where + ": strategy")
    gbs = pos_int(s, "gbs", where + ": strategy")
    need(gbs % (mbs * deg["dp"]) == 0, where, "gbs %d is not a multiple of mbs*dp = %d" % (gbs, mbs * deg["dp"]))
    ga = s.get("grad_accum")
    need(ga is None or ga * mbs * deg["dp"] == gbs, where, "grad_accum*mbs*dp != gbs")
    ep = s.get("ep")
    if ep:
        need("moe" in m, where, "strategy.ep given for a dense model")
        need(m["moe"]["experts"] % ep == 0, where, "ep must divide experts")
    need(s.get("recompute") in ("none", "selective", "full"), where,
         "strategy.recompute must be none, selective or full")
    need(s.get("zero") in (0, 1, 2, 3), where, "strategy.zero must be 0..3")
    rm = s.get("recompute_modules")
    need(rm is None or (isinstance(rm, list) and all(x in RECOMPUTE_MODULES for x in rm)), where,
         "strategy.recompute_modules must be a list of %s" % ", ".join(RECOMPUTE_MODULES))
    need(rm is None or s.get("recompute") == "selective", where,
         "strategy.recompute_modules needs recompute selective")
    need(s.get("grad_reduce_dtype") in (None, "fp32", "bf16", "fp16"), where,
         "strategy.grad_reduce_dtype must be fp32, bf16 or fp16")
    for k in ("sp", "flash_attn", "overlap_grad_reduce", "overlap_param_gather", "tp_comm_overlap",
              "ep_comm_overlap", "moe_force_balance"):
        need(k not in s or isinstance(s[k], bool), where, "strategy.%s must be true or false" % k)
    need(s.get("precision") in ("bf16", "fp16"), where, "strategy.precision must be bf16 or fp16")
    need(s.get("cp_comm") in (None, "ring", "allgather"), where, "strategy.cp_comm must be ring or allgather")
    ms = r.get("measured")
    need(ms is not None, where, "measured missing")
    keys(ms, MEASURED, where + ": measured")
    need(ms.get("metric") in METRICS, where, "measured.metric must be one of %s" % sorted(METRICS))
    v = pos_num(ms, "value", where + ": measured")
    if ms["metric"] == "mfu":
        need(v <= 1, where, "mfu is a fraction in (0, 1]")
    if ms["metric"] in ("model_tflops_per_gpu", "hw_tflops_per_gpu"):
        peak = c.get("peak_tflops", GPUS.get(gpu))
        need(v <= peak, where, "TFLOP/s per GPU above the GPU's peak")
    text(ms, "flops", where + ": measured")
    also = ms.get("also", {})
    need(isinstance(also, dict), where, "measured.also must be an object")
    for k, x in also.items():
        need(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0, where,
             "measured.also.%s must be a positive number" % k)
        need(k not in ("mfu", "hfu") or x <= 1, where, "measured.also.%s is a fraction" % k)
    # Cross-checks between figures the same row prints: they catch transcription slips.
    peak = c.get("peak_tflops", GPUS.get(gpu))
    figs = dict(also, **{ms["metric"]: v})
    if "mfu" in figs and "model_tflops_per_gpu" in figs:
        need(abs(figs["model_tflops_per_gpu"] / peak - figs["mfu"]) <= 0.006, where,
             "mfu %s disagrees with model_tflops_per_gpu %s / peak %s" % (figs["mfu"], figs["model_tflops_per_gpu"],
                                                                         peak))
    if "iter_s" in figs and "tokens_per_s" in figs:
        tps = s["gbs"] * m["seq"] / figs["iter_s"]
        need(abs(tps / figs["tokens_per_s"] - 1) <= 0.01, where,
             "tokens_per_s %s disagrees with gbs*seq/iter_s = %.0f" % (figs["tokens_per_s"], tps))
    if "tokens_per_s_per_gpu" in figs and "tokens_per_s" in figs:
        need(abs(figs["tokens_per_s_per_gpu"] * gpus / figs["tokens_per_s"] - 1) <= 0.01, where,
             "tokens_per_s disagrees with tokens_per_s_per_gpu * gpus")
    src = r.get("source")
    need(src is not None, where, "source missing")
    keys(src, SOURCE, where + ": source")
    for k in ("paper", "where", "note"):
        text(src, k, where + ": source")
    text(src, "url", where + ": source", False)
    need(src.get("slug") == slug, where, "source.slug must be the file stem %r" % slug)
    need(r.get("confidence") in ("high", "medium", "low"), where, "confidence must be high, medium or low")
    text(r, "framework", where)
    return rid


def render(rows):
    return "".join(json.dumps(x, separators=(",", ":")) + "\n" for x in rows)


def validate(corpus=CORPUS):
    files = sorted(corpus.glob("*.jsonl"))
    if not files:
        print("mofa_corpus: error: %s: no corpus files; run from a checkout or give --dir DIR" % corpus,
              file=sys.stderr)
        return 1
    readme = (corpus / "README.md").read_text() if (corpus / "README.md").exists() else ""
    seen, errors, total = {}, 0, 0
    print("%-32s %5s %9s  %s" % ("source", "rows", "GPUs", "hardware"))
    for f in files:
        slug = f.stem
        rows = 0
        hw, lo, hi = set(), None, None
        if "`%s`" % slug not in readme:
            print("mofa_corpus: error: %s: source not documented in corpus/README.md" % f.name, file=sys.stderr)
            errors += 1
        for n, line in enumerate(f.read_text().splitlines(), 1):
            where = "%s:%d" % (f.name, n)
            try:
                r = json.loads(line)
                rid = check_row(r, slug, where)
                need(rid not in seen, where, "duplicate id %s (first at %s)" % (rid, seen.get(rid)))
                seen[rid] = where
                rows += 1
                g = r["cluster"]["gpus"]
                lo = g if lo is None else min(lo, g)
                hi = g if hi is None else max(hi, g)
                hw.add(r["cluster"]["gpu"])
            except (ValueError, Bad) as e:
                print("mofa_corpus: error: %s" % e if isinstance(e, Bad) else
                      "mofa_corpus: error: %s: not JSON: %s" % (where, e), file=sys.stderr)
                errors += 1
        total += rows
        print("%-32s %5d %9s  %s" % (slug, rows, "%s-%s" % (lo, hi), ", ".join(sorted(hw))))
    print("%-32s %5d  (%d sources)" % ("total", total, len(files)))
    return 1 if errors else 0


def generated():
    out = {}
    for slug, fn in SOURCES.items():
        rows = fn()
        for r in rows:
            r["source"]["slug"] = slug
        out[slug] = render(rows)
    return out


def main(argv):
    if "--dir" in argv:
        i = argv.index("--dir")
        if i + 1 >= len(argv):
            print("mofa_corpus: error: --dir: missing directory; give --dir DIR", file=sys.stderr)
            return 2
        return validate(Path(argv[i + 1]))
    if "--write" in argv or "--check" in argv:
        out = generated()
        if "--check" in argv:
            stale = [s for s, t in out.items()
                     if not (CORPUS / (s + ".jsonl")).exists() or (CORPUS / (s + ".jsonl")).read_text() != t]
            for s in stale:
                print("mofa_corpus: error: %s.jsonl differs from the transcription; run --write" % s,
                      file=sys.stderr)
            if stale:
                return 1
        else:
            CORPUS.mkdir(parents=True, exist_ok=True)
            for s, t in out.items():
                tmp = CORPUS / (s + ".jsonl.tmp")
                tmp.write_text(t)
                tmp.replace(CORPUS / (s + ".jsonl"))
    return validate()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
