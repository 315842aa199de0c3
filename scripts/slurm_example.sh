#!/bin/bash
# MAML on Omniglot 5-way 1-shot over 2 nodes x 4 GPUs, with automatic requeue.
# --nodes / --ntasks-per-node must match trainer.num_nodes / trainer.devices.
#SBATCH --job-name=lit_meta_maml
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --output=logs/slurm-%j.out

source .venv/bin/activate
srun python train.py fit \
  --config configs/omniglot/maml_5w1s.yaml \
  --config configs/trainer/slurm.yaml \
  --trainer.num_nodes 2 --trainer.devices 4 \
  --data.root data/omniglot
