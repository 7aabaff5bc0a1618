"""Two CPU processes (gloo) train the fused loss through DDP on a model patched by the TRL drop-in's
`add_hidden_states_forward`, with find_unused_parameters on (transformers' choice when activation checkpointing is
off) and off; each rank prints the largest difference between its gradients and the mean of both ranks' gradients
computed without DDP, into a file of the folder given (the ranks' prints would interleave). Run by
tests/test_trl_trainer.py in a subprocess: `python ddp_trl_forward.py PORT FOLDER`."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tiny_untied_llama():  # untied: the LM head is used nowhere else in the forward
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False))


def rank_batch(rank):
    g = torch.Generator().manual_seed(rank + 1)
    return torch.randint(0, 50, (2, 8), generator=g), torch.ones(2, 8, dtype=torch.long), torch.randn(2, generator=g)


def loss_of(model, ids, mask, adv):
    from lambda_kernels import fused_grpo_lambda_loss

    hidden, weight, _ = model(input_ids=ids, attention_mask=mask, completion_hidden_states=4)
    return fused_grpo_lambda_loss(hidden, weight, ids[:, -4:], mask[:, -4:], adv, trace="both", impl="torch")[0]


def run(rank, find_unused, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from grpo_trainer.trl_trainer import add_hidden_states_forward

    model = tiny_untied_llama()
    add_hidden_states_forward(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
    try:
        for _ in range(2):  # a parameter DDP mis-marks as unused fails on the second backward
            model.zero_grad()
            loss_of(ddp, *rank_batch(rank)).backward()
        reference = tiny_untied_llama()
        add_hidden_states_forward(reference)
        for r in range(2):
            loss_of(reference, *rank_batch(r)).backward()  # accumulates both ranks' gradients
        worst = max((p.grad - q.grad / 2).abs().max().item()
                    for p, q in zip(model.parameters(), reference.parameters()))
        result = f"max_diff={worst:.3e}"
    except Exception as e:  # reported, not raised: the parent checks every rank's file
        result = f"error={type(e).__name__}: {str(e)[:300]}"
    dist.destroy_process_group()
    Path(folder, f"find_unused={find_unused} rank={rank}").write_text(result)


if __name__ == "__main__":
    base_port, folder = int(sys.argv[1]), sys.argv[2]
    for i, find_unused in enumerate((True, False)):
        mp.spawn(run, args=(find_unused, base_port + i, folder), nprocs=2)
