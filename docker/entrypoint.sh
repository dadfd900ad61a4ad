#!/usr/bin/env bash
# Container entrypoint: runs `megajepa ARGS...`; `sshd` instead makes the container a worker the
# DeepSpeed launcher reaches over ssh.
#
#   docker run ... megajepa:0.1.0 train configs/demo.yaml train.steps=50    # megajepa train ...
#   docker run ... megajepa:0.1.0 sshd                                      # worker, sshd on 2222
#
# The worker's sshd runs as this unprivileged user, with a host key made when the container
# starts; only this user logs in, with a key listed in ~/.ssh/authorized_keys (mount it).
set -euo pipefail

if [[ "${1:-}" == sshd ]]; then
    keys="$HOME/.sshd"
    mkdir -p "$keys"
    [[ -f "$keys/host_ed25519" ]] || ssh-keygen -q -t ed25519 -N '' -f "$keys/host_ed25519"
    # PAM needs root; keys are the only way in.
    exec /usr/sbin/sshd -D -e -p "${SSHD_PORT:-2222}" -h "$keys/host_ed25519" \
        -o PidFile="$keys/sshd.pid" -o UsePAM=no -o PasswordAuthentication=no
fi
exec megajepa "$@"
