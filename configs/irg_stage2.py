# IRG SFT, stage 2 of 2: only the two "full" modes (whole think -> image -> reflect -> image trajectories), from
# stage 1's export. Same recipe otherwise (read from irg_stage1.py): everything but the VAE trains.
#   torchrun --nproc_per_node=8 train.py configs/irg_stage2.py
# Data: IRG parquet with a `conversation` JSON column (see irg_stage1.py); its paths are set there.
import os

exec(open(os.path.join(os.path.dirname(__file__), "irg_stage1.py")).read())
init_from = "out/irg_stage1/export"  # stage 1's final weights (nanobagel layout, with its EMA)
sources = [s for s in sources if s["name"] in ("improving_full_learning", "initial_full_learning")]
warmup_steps = 0
out_dir = "out/irg_stage2"
