#!/bin/bash
# PPO (NeMo-Aligner) as one heterogeneous job. Component 0 serves the critic and the reward model (one
# process, Aligner's combine_rm_and_critic_server); component 1 trains the actor, which finds the
# server through the job's hostnames: the first host of component 0, on CRITIC_PORT (default 5556).
#   sbatch slurm/rlhf_ppo.sh critic:from_run=runs/rm actor:from_run=runs/sft actor:data_dir=runs/prep_rlhf \
#       actor:trainer.ppo.max_steps=50
# Overrides: `critic:KEY=VALUE` go to the server only, `actor:KEY=VALUE` to the actor only, plain
# KEY=VALUE to both. Each component's resources are its own header block below (edit the GPUs of each);
# each is its own torch.distributed world with its own rendezvous. The job ends with the actor: its
# exit status is the job's, and SLURM ends the server step with the job. Requeued, the actor resumes
# from its checkpoint; SIGUSR1 120 s before the limit goes to the actor, as for sft (slurm/_launch.sh).
# Component 0 runs `nemo-ft critic_server` (bound to 0.0.0.0: the actor is on other nodes), component 1
# `nemo-ft ppo critic.remote=true` with Aligner's remote_critic_rm.critic.{ip,port} pointing at it; the
# actor waits for the server's readiness (reward.ready_timeout_s) before its first request.
#SBATCH --job-name=nemo-ft-ppo
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --time=04:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH hetjob
#SBATCH --time=04:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
source "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh"
RUN_DIR=${RUN_DIR:-runs/ppo/${SLURM_JOB_NAME:-nemo-ft-ppo}}
CRITIC_PORT=${CRITIC_PORT:-5556}
critic=() actor=()
for arg in "$@"; do
  case $arg in
    critic:*) critic+=("${arg#critic:}") ;;
    actor:*) actor+=("${arg#actor:}") ;;
    *) critic+=("$arg"); actor+=("$arg") ;;
  esac
done

# Each component's nodes, and so its rendezvous (outside a job, DRY_RUN: placeholders).
server_host=$(nemo_ft_first_host "${SLURM_JOB_NODELIST_HET_GROUP_0:-}")
server_host=${server_host:-'<first host of component 0>'}
actor_host=$(nemo_ft_first_host "${SLURM_JOB_NODELIST_HET_GROUP_1:-}")
actor_host=${actor_host:-'<first host of component 1>'}
job=${SLURM_JOB_ID:-0}

serve() {
  nemo_ft_srun MASTER_ADDR="$server_host" MASTER_PORT="$MASTER_PORT" --het-group=0 \
    -- -m "$NEMO_FT_STAGE_PKG.critic_server" host=0.0.0.0 run.dir="$RUN_DIR/critic" trainer.ppo.port="$CRITIC_PORT" \
    "${critic[@]}"
}
if [ -n "${DRY_RUN:-}" ]; then serve; else serve & fi
nemo_ft_srun MASTER_ADDR="$actor_host" MASTER_PORT="$(nemo_ft_free_port $((job + 5000)))" --het-group=1 \
  -- -m "$NEMO_FT_STAGE_PKG.ppo" run.dir="$RUN_DIR/actor" critic.remote=true \
  remote_critic_rm.critic.ip="$server_host" remote_critic_rm.critic.port="$CRITIC_PORT" "${actor[@]}"
