"""Model Optimizer 0.44.0's GradNAS on a saved HF BERT classifier, run in a subprocess whose PYTHONPATH puts
`nvidia-modelopt==0.44.0` and `torchprofile==0.0.4` (installed with `pip install --no-deps --target DIR`) ahead
of the venv's Model Optimizer 0.47 (which no longer has GradNAS). Does not import megatron_prune.

    PYTHONPATH=DIR python modelopt_gradnas.py MODEL_FOLDER BATCHES.pt OUT.pt --constraint params=70% [--loss-scale 1000]

Writes {"state_dict", "constraints" (Model Optimizer's own measurement of the result), "is_satisfied",
"seconds"} to OUT.pt: the pruned weights, which the benchmark loads into the same architecture built by
megatron-prune, so that every method is evaluated and fine-tuned by the same code.
"""

import argparse
import time
import warnings

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("batches")
    p.add_argument("out")
    p.add_argument("--constraint", required=True, help="params=70%% or flops=60%%")
    p.add_argument("--loss-scale", type=float, default=1.0)
    p.add_argument("--dummy-seq", type=int, default=64)
    args = p.parse_args()

    import modelopt
    import modelopt.torch.prune as mtp
    from transformers import BertForSequenceClassification

    assert modelopt.__version__ == "0.44.0", f"expected Model Optimizer 0.44.0 first on PYTHONPATH, got {modelopt.__version__}"
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(args.model, attn_implementation="eager").eval()
    batches = torch.load(args.batches)
    key, value = args.constraint.split("=")
    scale = args.loss_scale
    start = time.time()
    _, state = mtp.prune(
        model=model, mode="gradnas", constraints={key: value},
        dummy_input=batches[0]["input_ids"][:1, :args.dummy_seq],
        config={"data_loader": batches, "collect_func": lambda b: (b,), "loss_func": lambda out, b: out.loss * scale,
                "max_iter_data_loader": len(batches) - 1,  # it consumes max_iter + 1 batches
                "verbose": False},
    )
    seconds = time.time() - start
    torch.save({"state_dict": model.state_dict(), "constraints": state["best"]["constraints"],
                "is_satisfied": bool(state["best"]["is_satisfied"]), "seconds": seconds}, args.out)
    print(f"modelopt 0.44 gradnas {args.constraint} x{scale}: {seconds:.1f} s, satisfied={state['best']['is_satisfied']}, "
          f"{state['best']['constraints']}", flush=True)


if __name__ == "__main__":
    main()
