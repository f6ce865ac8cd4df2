# Shared body of slurm/train_*.sbatch (sourced inside the job). Environment it reads:
#   CONFIG      config file(s) for the training command (required); several are composed in order, e.g.
#               CONFIG="configs/autoencoder/kl-f8.yaml configs/trainer/multinode-ddp.yaml"
#   OVERRIDES   extra arguments, e.g. "--trainer.max_steps=1000 --data.batch_size=64" (optional)
#   TRAIN_CMD   training command (default: `ldm-lightning fit`); gets `-c CONFIG... $OVERRIDES --ckpt_path last`
#   LDM_MASTER_ADDR  rendezvous address override (e.g. 127.0.0.1 when "nodes" are emulated on one machine)
# Fault tolerance is the CLI's default: SIGUSR1 (--signal=USR1@90, or `scancel --signal=USR1 --full`) saves at
# the next step boundary and requeues the job; the restart resumes from <default_root_dir>/checkpoints.
#   VENV        a virtualenv to activate first (optional)
#   MASTER_PORT rendezvous port (default: derived from the job id)
# shellcheck shell=bash

ldm_slurm_launch() {
  : "${CONFIG:?set CONFIG=<config.yaml> (e.g. CONFIG=configs/experiments/mnist_ae.yaml sbatch ...)}"
  if [ -n "${VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  fi
  # Rendezvous: the first node of the allocation. Lightning's SLURMEnvironment reads these.
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  export MASTER_ADDR="${LDM_MASTER_ADDR:-$MASTER_ADDR}"   # LDM_MASTER_ADDR: e.g. 127.0.0.1 on emulated nodes
  export MASTER_PORT="${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}"
  # W&B: one run per Slurm job, continued across requeues (the job id survives `scontrol requeue`).
  export WANDB_RUN_ID="${WANDB_RUN_ID:-slurm-${SLURM_JOB_ID}}"
  export WANDB_RESUME="${WANDB_RESUME:-allow}"
  # NCCL: turn a hung collective (dead peer) into an error instead of a silent hang until the time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
  export NCCL_ASYNC_ERROR_HANDLING=1   # name used by torch < 2.2
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

  echo "[ldm-slurm] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}" \
       "(${SLURM_NNODES} node(s) x ${SLURM_NTASKS_PER_NODE:-?} task(s)); master ${MASTER_ADDR}:${MASTER_PORT};" \
       "$(date -u +%FT%TZ)"
  # `scancel --signal=USR1 --full` also signals this shell, whose default USR1 action is to die:
  # note it and carry on (the training tasks got the signal too and handle it).
  trap 'echo "[ldm-slurm] USR1 reached the batch shell; the tasks checkpoint (and requeue the job unless it is --no-requeue)"' USR1
  local cmd
  read -r -a cmd <<< "${TRAIN_CMD:-ldm-lightning fit}"
  local -a overrides=() configs=()
  if [ -n "${OVERRIDES:-}" ]; then read -r -a overrides <<< "$OVERRIDES"; fi
  local c
  for c in $CONFIG; do configs+=(-c "$c"); done
  # --ckpt_path last: the newest VALID checkpoint of this run (none on the first start -> from scratch).
  # --kill-on-bad-exit: one crashed rank ends the step instead of leaving the others in a collective.
  srun --kill-on-bad-exit=1 "${cmd[@]}" "${configs[@]}" "${overrides[@]}" \
       --trainer.num_nodes="${SLURM_NNODES}" --trainer.devices="${SLURM_NTASKS_PER_NODE:-1}" --ckpt_path last
}
