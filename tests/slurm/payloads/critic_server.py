"""Stands in for `nemo-ft critic_server` in slurm/rlhf_ppo.sh: serves on trainer.ppo.port (bound to the
script's host=) and answers with its hostname, until the job ends."""
import os
import socket

from tests.slurm.payloads import overrides, say


def critic(o: dict) -> int:
    port = int(o["trainer.ppo.port"])
    with socket.create_server((o.get("host", "0.0.0.0"), port)) as srv:
        say(f"critic serving on port {port} (rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']})")
        srv.settimeout(120)
        while True:  # until the job ends
            conn, _ = srv.accept()
            with conn:
                conn.sendall(f"critic on {socket.gethostname()}".encode())


if __name__ == "__main__":
    raise SystemExit(critic(overrides()))
