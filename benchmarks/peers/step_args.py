"""The command line every step-time peer takes, so step_time.py can call them alike."""

import argparse


def parse_step_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="frozen", choices=("frozen", "finetune", "full"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20)
    return ap.parse_args()
