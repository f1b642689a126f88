#!/usr/bin/env bash
# A real single-node SLURM on localhost for the SLURM tests (Debian 12, slurm-wlm 22.05, as root):
# munged + MariaDB + slurmdbd + slurmctld + slurmd, everything (config, keys, state, logs, database)
# under DIR; nothing under /etc is written.
#
#   tests/slurm/cluster.sh start  [DIR]   install the packages if missing, configure, start, wait until
#                                          the node is idle and accounting answers. Idempotent.
#   tests/slurm/cluster.sh stop   [DIR]   cancel jobs, stop every daemon (by pidfile)
#   tests/slurm/cluster.sh status [DIR]   the daemons and sinfo; rc 1 if one is down
#   tests/slurm/cluster.sh env    [DIR]   prints `export SLURM_CONF=...`; use: eval "$(tests/slurm/cluster.sh env)"
#
# DIR defaults to $PRETRAIN_SLURM_DIR or /tmp/pretrain-slurm. Ports (127.0.0.1 only): slurmctld 6817,
# slurmd 6818, slurmdbd 6819, MariaDB 3307. Why each setting is there:
#   accounting (slurmdbd + MariaDB)  submitit learns from sacct that a job died without a result
#                                    (crash, scancel, time limit); without it such jobs hang forever.
#   cred_expire=5, bf_interval=1     a requeued job restarts in seconds instead of after 120 s.
#   KillWait=5                       submitit ignores SIGTERM; SIGKILL follows 5 s later, not 30.
#   EnforcePartLimits=ALL            an impossible request is refused at submission, not PENDING forever.
#   NodeName=localhost, slurmd -N    the machine's hostname never matters.
#   munge key dir 0700, socket dir 0755  munged refuses a socket dir others cannot traverse.
set -euo pipefail

CMD=${1:-start}
DIR=${2:-${PRETRAIN_SLURM_DIR:-/tmp/pretrain-slurm}}
PARTITION=debug
NODE=localhost
CTLD_PORT=6817 SLURMD_PORT=6818 DBD_PORT=6819 MYSQL_PORT=3307
TIMEOUT=90  # seconds to wait for each daemon

ETC=$DIR/etc RUN=$DIR/run LOG=$DIR/log SPOOL=$DIR/spool MUNGE_DIR=$DIR/munge
CONF=$ETC/slurm.conf
MUNGE_SOCK=$RUN/munge/munge.socket.2
MYSQL_SOCK=$RUN/mysqld.sock
export SLURM_CONF=$CONF

log() { printf '[slurm %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# pid from a pidfile when that process is alive (not a zombie) and is the expected program, else empty
live_pid() { # pidfile comm
    local f=$1 comm=$2 pid
    [[ -s $f ]] || return 0
    pid=$(tr -dc 0-9 < "$f")
    [[ -n $pid && -d /proc/$pid ]] || return 0
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) == Z ]] && return 0
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] && echo "$pid"
    return 0
}

wait_gone() { # pid seconds
    local pid=$1 n=$(( $2 * 10 ))
    while (( n-- > 0 )); do
        [[ -d /proc/$pid && $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 0
        sleep 0.1
    done
    return 1
}

wait_live() { # pidfile comm seconds
    local n=$(( $3 * 10 ))
    until [[ -n $(live_pid "$1" "$2") ]]; do (( n-- > 0 )) || return 1; sleep 0.1; done
}

stop_pidfile() { # pidfile comm [seconds]
    local pid; pid=$(live_pid "$1" "$2")
    [[ -z $pid ]] && return 0
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "${3:-15}"; then
        log "$2 (pid $pid) ignored SIGTERM; SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 5 || true
    fi
}

ensure_packages() {
    local b missing=0
    for b in slurmctld slurmd sbatch munged mungekey slurmdbd mariadbd mariadb-install-db; do
        command -v "$b" >/dev/null || missing=1
    done
    ls /usr/lib/*/slurm-wlm/accounting_storage_mysql.so >/dev/null 2>&1 || missing=1
    (( missing )) || return 0
    [[ $(id -u) -eq 0 ]] || die "SLURM packages are missing and this is not root"
    command -v apt-get >/dev/null || die "SLURM packages are missing and there is no apt-get"
    local pkgs=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server) t0=$SECONDS added_policy=0
    log "installing ${pkgs[*]}"
    # keep the packages' init scripts from starting system-wide daemons
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; added_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
    (( added_policy )) && rm -f /usr/sbin/policy-rc.d
    log "install took $(( SECONDS - t0 ))s"
}

configure() {
    mkdir -p "$ETC" "$RUN/munge" "$LOG" "$SPOOL/ctld" "$SPOOL/d" "$MUNGE_DIR"
    chmod 700 "$MUNGE_DIR"; chmod 755 "$DIR" "$RUN" "$RUN/munge"
    (( ${#MUNGE_SOCK} < 100 )) || die "DIR too long: the unix socket path $MUNGE_SOCK must stay under ~107 bytes"
    [[ -s $MUNGE_DIR/munge.key ]] || { mungekey --create --keyfile="$MUNGE_DIR/munge.key"; chmod 400 "$MUNGE_DIR/munge.key"; }
    [[ -s $ETC/.dbpass ]] || { head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$ETC/.dbpass"; chmod 600 "$ETC/.dbpass"; }
    local hw; hw=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //')   # this machine's CPUs, memory
    cat > "$CONF" <<EOF
# generated by tests/slurm/cluster.sh: one node on localhost
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=5
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
EnforcePartLimits=ALL
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# slurmctld and sacct reach slurmdbd through this munge socket, not AuthInfo's
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=300
SlurmctldTimeout=120
InactiveLimit=0
MinJobAge=86400
KillWait=5
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    cat > "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/.dbpass")
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
}

start_munged() {
    [[ -n $(live_pid "$RUN/munge/munged.pid" munged) ]] && return 0
    munged --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCK" --pid-file="$RUN/munge/munged.pid" \
           --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed" --num-threads=4
    munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK" >/dev/null || die "munge round trip failed (see $LOG/munged.log)"
}

start_mariadb() {
    if [[ -z $(live_pid "$RUN/mariadb.pid" mariadbd) ]]; then
        if [[ ! -d $DIR/mysql/mysql ]]; then
            mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root \
                --auth-root-authentication-method=socket --skip-test-db > "$LOG/mariadb-install.log" 2>&1 \
                || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
        fi
        setsid mariadbd --no-defaults --datadir="$DIR/mysql" --socket="$MYSQL_SOCK" --port="$MYSQL_PORT" \
            --bind-address=127.0.0.1 --user=root --pid-file="$RUN/mariadb.pid" --log-error="$LOG/mariadb.err" \
            --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
    fi
    local n=$(( TIMEOUT * 10 ))
    until mariadb-admin --no-defaults -S "$MYSQL_SOCK" -uroot ping >/dev/null 2>&1; do
        (( n-- > 0 )) || die "mariadb did not come up (see $LOG/mariadb.err)"; sleep 0.1
    done
    local pw; pw=$(cat "$ETC/.dbpass")
    mariadb --no-defaults -S "$MYSQL_SOCK" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start_slurmdbd() {
    [[ -z $(live_pid "$RUN/slurmdbd.pid" slurmdbd) ]] && slurmdbd
    local n=$(( TIMEOUT * 10 ))
    until sacctmgr -n show cluster >/dev/null 2>&1; do
        (( n-- > 0 )) || die "slurmdbd does not answer (see $LOG/slurmdbd.log)"; sleep 0.1
    done
}

node_state() { { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null || true; } | head -1; }

start_slurm() {
    [[ -z $(live_pid "$RUN/slurmctld.pid" slurmctld) ]] && slurmctld
    [[ -z $(live_pid "$RUN/slurmd.pid" slurmd) ]] && slurmd -N "$NODE"
    wait_live "$RUN/slurmctld.pid" slurmctld 10 || die "slurmctld did not start (see $LOG/slurmctld.log)"
    wait_live "$RUN/slurmd.pid" slurmd 10 || die "slurmd did not start (see $LOG/slurmd.log)"
    local n=$(( TIMEOUT * 5 )) st
    while :; do
        st=$(node_state)
        case $st in
            idle|mixed|allocated|completing) break ;;
            *drain*|down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        (( n-- > 0 )) || die "node not idle (state '$st'; see $LOG/slurmctld.log, $LOG/slurmd.log)"
        sleep 0.2
    done
    n=$(( TIMEOUT * 5 ))  # the cluster registered with slurmdbd: sacct answers for its jobs
    until sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx local; do
        (( n-- > 0 )) || die "the cluster never registered with slurmdbd"; sleep 0.2
    done
}

stop_slurm() {
    local ctld d
    ctld=$(live_pid "$RUN/slurmctld.pid" slurmctld); d=$(live_pid "$RUN/slurmd.pid" slurmd)
    [[ -z $ctld && -z $d ]] && return 0
    if [[ -n $ctld ]] && scontrol ping >/dev/null 2>&1; then
        if [[ -n $(squeue -h -o %i 2>/dev/null) ]]; then
            log "cancelling jobs"; scancel -p "$PARTITION" 2>/dev/null || true
            local n=150; while [[ -n $(squeue -h -o %i 2>/dev/null) ]] && (( n-- > 0 )); do sleep 0.2; done
        fi
        scontrol shutdown >/dev/null 2>&1 || true  # stops slurmctld and slurmd, saving state
        [[ -n $ctld ]] && { wait_gone "$ctld" 15 || true; }
        [[ -n $d ]] && { wait_gone "$d" 15 || true; }
    fi
    stop_pidfile "$RUN/slurmctld.pid" slurmctld
    stop_pidfile "$RUN/slurmd.pid" slurmd
}

case $CMD in
    start)
        [[ $(id -u) -eq 0 ]] || die "run as root (the daemons and the jobs run as root)"
        t0=$SECONDS
        ensure_packages
        configure
        start_munged
        start_mariadb
        start_slurmdbd
        start_slurm
        log "ready in $(( SECONDS - t0 ))s: node $NODE $(node_state), partition $PARTITION"
        echo "export SLURM_CONF=$CONF" ;;
    stop)
        stop_slurm
        stop_pidfile "$RUN/slurmdbd.pid" slurmdbd
        stop_pidfile "$RUN/mariadb.pid" mariadbd 60
        stop_pidfile "$RUN/munge/munged.pid" munged
        log "stopped" ;;
    status)
        rc=0
        for entry in munged:munge/munged.pid mariadbd:mariadb.pid slurmdbd:slurmdbd.pid slurmctld:slurmctld.pid slurmd:slurmd.pid; do
            name=${entry%%:*}; pid=$(live_pid "$RUN/${entry#*:}" "$name")
            printf '%-10s %s\n' "$name" "${pid:+pid $pid}"
            [[ -n $pid ]] || rc=1
        done
        sinfo 2>&1 || rc=1
        exit $rc ;;
    env)
        echo "export SLURM_CONF=$CONF" ;;
    *)
        echo "usage: $0 {start|stop|status|env} [DIR]" >&2; exit 2 ;;
esac
