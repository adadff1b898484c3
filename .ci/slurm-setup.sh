#!/usr/bin/env bash
# slurm-setup.sh -- install and start a real single-node SLURM cluster for CI
# on Debian 12 (bookworm, slurm-wlm 22.05), without systemd.
#
#   slurm-setup.sh            install (if needed), configure, start, verify
#   slurm-setup.sh --no-verify   same, but skip the test jobs
#   slurm-setup.sh --verify      only run the test jobs against a running cluster
#   slurm-setup.sh --status      print the state of the daemons and the node
#   slurm-setup.sh --stop        cancel all jobs, stop every daemon started here
#
# Daemons (all started directly, as background daemons):
#   munged (as user munge), mariadbd (as user mysql, unix socket only),
#   slurmdbd, slurmctld, slurmd (as root; SlurmUser=root).
# Accounting: slurmdbd + MariaDB, so plain `sacct` works.
#
# Environment knobs (optional):
#   SLURM_CLUSTER_NAME (default: ci), SLURM_PARTITION (default: debug),
#   SLURM_SETUP_TIMEOUT seconds to wait for the node to become idle (default 60).
set -euo pipefail

CLUSTER="${SLURM_CLUSTER_NAME:-ci}"
PARTITION="${SLURM_PARTITION:-debug}"
TIMEOUT="${SLURM_SETUP_TIMEOUT:-60}"

CONF_DIR=/etc/slurm
SLURM_CONF="$CONF_DIR/slurm.conf"
DBD_CONF="$CONF_DIR/slurmdbd.conf"
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
MYSQL_RUN=/run/mysqld
MYSQL_PID=$MYSQL_RUN/mysqld.pid
MYSQL_SOCK=$MYSQL_RUN/mysqld.sock
MYSQL_LOG_DIR=/var/log/mysql
DB_NAME=slurm_acct_db
DB_USER=slurm

PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
NEEDED_BINS=(sbatch squeue sacct sacctmgr scontrol sinfo scancel srun
             slurmctld slurmd slurmdbd munged mungekey mariadbd mariadb)

log()  { printf '[slurm-setup] %s\n' "$*"; }
warn() { printf '[slurm-setup] WARNING: %s\n' "$*" >&2; }

show_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" "$LOG_DIR/slurmdbd.log" \
             /var/log/munge/munged.log "$MYSQL_LOG_DIR/error.log"; do
        if [ -s "$f" ]; then
            printf '\n----- tail -n 25 %s -----\n' "$f" >&2
            tail -n 25 "$f" >&2 || true
        fi
    done
}

die() {
    printf '[slurm-setup] ERROR: %s\n' "$*" >&2
    show_logs
    exit 1
}

# proc_alive PID -> 0 if PID exists and is not a zombie (a killed daemon can
# stay a zombie for a while here, as PID 1 is not an init that reaps at once)
proc_alive() {
    local st
    kill -0 "$1" 2>/dev/null || return 1
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# pid_alive PIDFILE COMM -> 0 if the pid in PIDFILE is alive and is COMM
pid_alive() {
    local pidfile=$1 comm=$2 pid
    [ -r "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] || return 1
    proc_alive "$pid" || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}

# live (non-zombie) pids of processes whose command name is exactly COMM
pids_of() {
    local p
    for p in $(pgrep -x "$1" 2>/dev/null || true); do
        proc_alive "$p" && echo "$p"
    done
    return 0
}

# stop_proc PIDFILE COMM: TERM the daemon (pidfile first, then any leftover
# process with exactly that name), wait up to 15 s, then KILL.
stop_proc() {
    local pidfile=$1 comm=$2 pids="" pid i
    if pid_alive "$pidfile" "$comm"; then pids=$(tr -dc '0-9' <"$pidfile"); fi
    pids="$pids $(pids_of "$comm")"
    pids=$(echo "$pids" | tr ' ' '\n' | grep -E '^[0-9]+$' | sort -u | tr '\n' ' ' || true)
    if [ -z "${pids// /}" ]; then rm -f "$pidfile"; return 0; fi
    log "stopping $comm (pid ${pids% })"
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for i in $(seq 1 30); do
        local alive=""
        for pid in $pids; do proc_alive "$pid" && alive="$alive $pid"; done
        [ -z "$alive" ] && break
        sleep 0.5
    done
    for pid in $pids; do
        if proc_alive "$pid"; then
            warn "$comm (pid $pid) ignored SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$pidfile"
}

# ---------------------------------------------------------------- install
install_packages() {
    local missing=() b
    for b in "${NEEDED_BINS[@]}"; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "packages already installed ($(dpkg-query -W -f='${Version}' slurmctld 2>/dev/null || echo '?'))"
        return 0
    fi
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from trying to start services (no init system here);
    # only add our own policy-rc.d if none exists, and remove it afterwards.
    local own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local rc=0
    apt-get update -qq >/tmp/slurm-setup-apt.log 2>&1 || rc=$?
    if [ $rc -eq 0 ]; then
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>/tmp/slurm-setup-apt.log 2>&1 || rc=$?
    fi
    [ $own_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    if [ $rc -ne 0 ]; then
        tail -n 30 /tmp/slurm-setup-apt.log >&2
        die "apt-get failed (rc=$rc); full log in /tmp/slurm-setup-apt.log"
    fi
    log "installed: $(dpkg-query -W -f='${Package}=${Version} ' "${PACKAGES[@]}")"
}

# ---------------------------------------------------------------- munge
start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [ ! -s "$MUNGE_KEY" ]; then
        log "creating munge key $MUNGE_KEY"
        rm -f "$MUNGE_KEY"
        mungekey --create --keyfile="$MUNGE_KEY" 2>/dev/null \
            || dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    if pid_alive "$MUNGE_PID" munged; then
        log "munged already running"
    else
        log "starting munged"
        # a stale socket/lock of a dead munged would make it refuse to start
        stop_proc "$MUNGE_PID" munged
        rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
        runuser -u munge -- /usr/sbin/munged </dev/null || die "munged failed to start"
    fi
    local i
    for i in $(seq 1 20); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    die "munge credential round-trip (munge -n | unmunge) failed"
}

# ---------------------------------------------------------------- mariadb
start_mariadb() {
    install -d -o mysql -g mysql -m 0755 "$MYSQL_RUN"
    install -d -o mysql -g adm -m 2750 "$MYSQL_LOG_DIR"
    if [ ! -d /var/lib/mysql/mysql ]; then
        log "initialising MariaDB data directory"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db \
            >/tmp/slurm-setup-mariadb-install.log 2>&1 \
            || { cat /tmp/slurm-setup-mariadb-install.log >&2; die "mariadb-install-db failed"; }
    fi
    if pid_alive "$MYSQL_PID" mariadbd && mariadb-admin --socket="$MYSQL_SOCK" ping >/dev/null 2>&1; then
        log "mariadbd already running"
    else
        stop_proc "$MYSQL_PID" mariadbd
        log "starting mariadbd (unix socket only)"
        setsid /usr/sbin/mariadbd --user=mysql --skip-networking \
            --pid-file="$MYSQL_PID" --socket="$MYSQL_SOCK" \
            --log-error="$MYSQL_LOG_DIR/error.log" </dev/null >/dev/null 2>&1 &
        local i
        for i in $(seq 1 60); do
            mariadb-admin --socket="$MYSQL_SOCK" ping >/dev/null 2>&1 && break
            sleep 0.5
        done
        mariadb-admin --socket="$MYSQL_SOCK" ping >/dev/null 2>&1 || die "mariadbd did not come up"
    fi
}

db_password() {
    # keep the password of an existing slurmdbd.conf, else make a new one
    local p=""
    [ -r "$DBD_CONF" ] && p=$(sed -n 's/^StoragePass=//p' "$DBD_CONF" | head -n1)
    [ -n "$p" ] || p=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 20)
    printf '%s' "$p"
}

setup_database() {
    local pass=$1
    mariadb --socket="$MYSQL_SOCK" -u root <<SQL || die "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
SQL
}

# ---------------------------------------------------------------- config
write_configs() {
    local node=$1 pass=$2 ncpu mem_total mem def_mem
    ncpu=$(nproc)
    mem_total=$(awk '/^MemTotal:/{print int($2/1024)}' /proc/meminfo)   # = free -m total
    mem=$(( mem_total * 95 / 100 ))                  # a bit below the total
    def_mem=$(( mem / ncpu )); [ "$def_mem" -gt 1024 ] && def_mem=1024
    # real topology from slurmd -C when it agrees with nproc (else CPUs only;
    # SlurmdParameters=config_overrides keeps a mismatch from draining the node)
    local hw topo="" hwcpus=""
    hw=$(slurmd -C 2>/dev/null | head -n1 || true)
    hwcpus=$(printf '%s\n' "$hw" | sed -n 's/.* CPUs=\([0-9]*\) .*/\1/p')
    if [ "$hwcpus" = "$ncpu" ]; then
        topo=$(printf '%s\n' "$hw" | grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' || true)
    fi
    install -d -m 0755 "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" "$SLURMD_SPOOL"
    install -d -m 0700 "$CTLD_STATE"

    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by slurm-setup.sh: single-node CI cluster (no systemd, no cgroups).
ClusterName=$CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in this sandbox
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
ReturnToService=2
SlurmdParameters=config_overrides
# scheduling: every CPU is a schedulable unit, memory is consumable
SchedulerType=sched/backfill
# schedule right after submit/completion events (default batch_sched_delay=3
# adds ~3 s per scheduling round, which slows short CI jobs a lot)
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$def_mem
# a job whose dependency can never be satisfied (e.g. afterok on a failed
# array task) is cancelled (Reason=DependencyNeverSatisfied), not left pending
DependencyParameters=kill_invalid_depend
# timers
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
# accounting: slurmdbd + MariaDB (plain sacct works)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
# plus a plain-text record of every finished job (also readable by sacct -c)
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
# the node and the partition
NodeName=$node NodeAddr=127.0.0.1 CPUs=$ncpu${topo:+ $topo} RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    install -m 0644 "$tmp" "$SLURM_CONF"

    cat >"$tmp" <<EOF
# Written by slurm-setup.sh
AuthType=auth/munge
DbdHost=$node
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=$DB_USER
StoragePass=$pass
StorageLoc=$DB_NAME
EOF
    install -m 0600 -o root -g root "$tmp" "$DBD_CONF"
    rm -f "$tmp"
    log "wrote $SLURM_CONF (NodeName=$node CPUs=$ncpu RealMemory=$mem) and $DBD_CONF"
}

# ---------------------------------------------------------------- slurm daemons
stop_slurm_daemons() {
    stop_proc "$RUN_DIR/slurmd.pid" slurmd
    stop_proc "$RUN_DIR/slurmctld.pid" slurmctld
    stop_proc "$RUN_DIR/slurmdbd.pid" slurmdbd
}

start_slurmdbd() {
    log "starting slurmdbd"
    /usr/sbin/slurmdbd </dev/null >>"$LOG_DIR/slurmdbd.stdout" 2>&1 || die "slurmdbd failed to start"
    local i
    for i in $(seq 1 60); do
        sacctmgr -n -P list cluster format=Cluster >/dev/null 2>&1 && break
        sleep 0.5
    done
    sacctmgr -n -P list cluster format=Cluster >/dev/null 2>&1 || die "slurmdbd does not answer (sacctmgr list cluster)"
    if ! sacctmgr -n -P list cluster format=Cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        log "registering cluster '$CLUSTER' in the accounting database"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
    fi
}

# Jobs that the saved controller state still lists as running although no
# slurmstepd exists any more (daemons killed with running jobs) would keep the
# node allocated for a long time: cancel them.
cancel_ghost_jobs() {
    local jobs i
    [ -z "$(pids_of slurmstepd)" ] || return 0
    for i in $(seq 1 20); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.25; done
    jobs=$(squeue -h -t RUNNING,SUSPENDED,CONFIGURING -o '%i' 2>/dev/null | tr '\n' ' ' || true)
    [ -n "${jobs// /}" ] || return 0
    log "cancelling jobs left 'running' by a previous cluster that died: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
}

node_state() { sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n1; }

cluster_healthy() {
    local node=$1 st
    pid_alive "$MUNGE_PID" munged || return 1
    pid_alive "$MYSQL_PID" mariadbd || return 1
    pid_alive "$RUN_DIR/slurmdbd.pid" slurmdbd || return 1
    pid_alive "$RUN_DIR/slurmctld.pid" slurmctld || return 1
    pid_alive "$RUN_DIR/slurmd.pid" slurmd || return 1
    scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    st=$(node_state "$node")
    case "$st" in idle|mixed|allocated|completing) ;; *) return 1 ;; esac
    sacct -n -X -S now -o JobID >/dev/null 2>&1 || return 1
}

wait_for_idle() {
    local node=$1 st="" i resumed=0
    for i in $(seq 1 $(( TIMEOUT * 2 ))); do
        st=$(node_state "$node")
        case "$st" in
            idle) return 0 ;;
            down*|drain*|fail*)
                if [ $resumed -lt 3 ] && [ $(( i % 4 )) -eq 0 ]; then
                    log "node is '$st', resuming it"
                    scontrol update nodename="$node" state=resume 2>/dev/null || true
                    resumed=$(( resumed + 1 ))
                fi ;;
        esac
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    scontrol show node "$node" >&2 || true
    die "node $node did not become idle within ${TIMEOUT}s (state: '${st:-none}')"
}

start_slurm() {
    local node=$1
    install -d -m 0755 "$LOG_DIR" "$RUN_DIR" "$SLURMD_SPOOL"
    install -d -m 0700 "$CTLD_STATE"
    start_slurmdbd
    log "starting slurmctld"
    /usr/sbin/slurmctld </dev/null >>"$LOG_DIR/slurmctld.stdout" 2>&1 || die "slurmctld failed to start"
    local i
    for i in $(seq 1 40); do
        scontrol ping 2>/dev/null | grep -q 'is UP' && break
        sleep 0.5
    done
    scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer (scontrol ping)"
    log "starting slurmd"
    /usr/sbin/slurmd </dev/null >>"$LOG_DIR/slurmd.stdout" 2>&1 || die "slurmd failed to start"
    cancel_ghost_jobs
    wait_for_idle "$node"
}

# ---------------------------------------------------------------- verify
job_state() { scontrol show job "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n1; }

# wait_job_end JOBID SECONDS -> prints the final JobState (or the last one seen)
wait_job_end() {
    local j=$1 n=$(( $2 * 4 )) st="" i
    for i in $(seq 1 "$n"); do
        st=$(job_state "$j")
        case "$st" in PENDING|CONFIGURING|RUNNING|COMPLETING|"") sleep 0.25 ;; *) break ;; esac
    done
    printf '%s' "$st"
}

verify() {
    local node=$1 dir j a d i st out
    dir=$(mktemp -d /tmp/slurm-setup-verify.XXXXXX)
    chmod 0755 "$dir"
    log "verify: srun hostname"
    out=$(cd "$dir" && timeout 60 srun -J setup-srun hostname) || die "srun hostname failed"
    log "verify: srun ran on '$out'"
    # (sbatch --wait works too, but it polls at growing intervals: 2 s, then 4 s, ...,
    #  so poll scontrol ourselves to keep this quick)
    log "verify: sbatch --wrap hostname"
    j=$(cd "$dir" && sbatch --parsable -J setup-hostname -o "$dir/hostname.out" --wrap hostname) \
        || die "sbatch hostname failed"
    st=$(wait_job_end "$j" 60)
    [ "$st" = COMPLETED ] || die "test job $j ended in state '$st', expected COMPLETED"
    out=$(cat "$dir/hostname.out" 2>/dev/null || true)
    [ -n "$out" ] || die "test job $j produced no output"
    log "verify: batch job $j COMPLETED on '$out'"

    log "verify: array 1-3 (task 2 exits 1) + afterok dependent job"
    # shellcheck disable=SC2016  # $SLURM_ARRAY_TASK_ID is expanded by the job
    a=$(cd "$dir" && sbatch --parsable -J setup-array --array=1-3 -o "$dir/array_%a.out" \
        --wrap 'if [ "$SLURM_ARRAY_TASK_ID" = 2 ]; then exit 1; fi; echo ok') || die "array submit failed"
    d=$(cd "$dir" && sbatch --parsable -J setup-dep --dependency="afterok:$a" -o "$dir/dep.out" \
        --wrap "touch $dir/dep_ran") || die "dependent submit failed"
    st=$(wait_job_end "$d" 60)
    [ "$st" = CANCELLED ] || die "dependent job $d ended in state '$st', expected CANCELLED"
    [ ! -e "$dir/dep_ran" ] || die "dependent job $d ran although array task ${a}_2 failed"
    log "verify: dependent job $d: $(scontrol show job "$d" | grep -o 'JobState=[^ ]* Reason=[^ ]*')"

    # accounting records reach slurmdbd asynchronously: poll briefly
    local want got=""
    want=$(printf '%s\n' "${a}_1|COMPLETED|0:0" "${a}_2|FAILED|1:0" "${a}_3|COMPLETED|0:0" "${d}|CANCELLED|0:0" \
        | sort | tr '\n' ' ' | sed 's/ $//')
    for i in $(seq 1 40); do
        got=$( (sacct -X -n -P -j "$a,$d" --format=JobID,State,ExitCode 2>/dev/null || true) | sort | tr '\n' ' ' | sed 's/ $//')
        [ "$got" = "$want" ] && break
        sleep 0.5
    done
    [ "$got" = "$want" ] || die "sacct shows '$got', expected '$want'"
    log "verify: sacct: $got"
    rm -rf "$dir"
    log "verify: OK"
}

status() {
    local node=$1 d
    for d in "munged:$MUNGE_PID" "mariadbd:$MYSQL_PID" "slurmdbd:$RUN_DIR/slurmdbd.pid" \
             "slurmctld:$RUN_DIR/slurmctld.pid" "slurmd:$RUN_DIR/slurmd.pid"; do
        if pid_alive "${d#*:}" "${d%%:*}"; then
            log "${d%%:*}: running (pid $(cat "${d#*:}"))"
        else
            log "${d%%:*}: not running"
        fi
    done
    if [ -r "$SLURM_CONF" ] && scontrol ping 2>/dev/null | grep -q 'is UP'; then
        sinfo
    fi
}

# all (live) descendants of PID, children first listed after their parent
descendants() {
    local c
    for c in $(pgrep -P "$1" 2>/dev/null || true); do
        proc_alive "$c" && echo "$c"
        descendants "$c"
    done
    return 0
}

# stray job steps (slurmstepd) and everything they started; with
# proctrack/linuxproc, killing slurmstepd alone would orphan the job's processes
kill_job_steps() {
    local steps kids p
    steps=$(pids_of slurmstepd | tr '\n' ' ')
    [ -n "${steps// /}" ] || return 0
    kids=""
    for p in $steps; do kids="$kids $(descendants "$p" | tr '\n' ' ')"; done
    log "killing leftover job steps (slurmstepd $steps; job processes:${kids:- none})"
    for p in $steps $kids; do kill -KILL "$p" 2>/dev/null || true; done
    sleep 0.5
}

stop_all() {
    if [ -r "$SLURM_CONF" ] && pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
        local jobs i
        jobs=$(squeue -h -o '%F' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for i in $(seq 1 40); do
                [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.25
            done
        fi
    fi
    stop_slurm_daemons
    kill_job_steps
    stop_proc "$MYSQL_PID" mariadbd
    stop_proc "$MUNGE_PID" munged
    log "all daemons stopped"
}

# ---------------------------------------------------------------- main
main() {
    local mode=setup verify_after=1
    case "${1:-}" in
        "") ;;
        --no-verify) verify_after=0 ;;
        --verify) mode=verify ;;
        --stop) mode=stop ;;
        --status) mode=status ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "usage: $0 [--no-verify|--verify|--status|--stop]" >&2; exit 2 ;;
    esac
    [ "$(id -u)" -eq 0 ] || { echo "slurm-setup.sh must run as root" >&2; exit 1; }

    local node
    node=$(hostname -s)
    [ -n "$node" ] || { echo "hostname -s is empty" >&2; exit 1; }

    case "$mode" in
        stop)   stop_all; return 0 ;;
        status) status "$node"; return 0 ;;
        verify) cluster_healthy "$node" || die "cluster is not up"; verify "$node"; return 0 ;;
    esac

    local t0=$SECONDS
    if command -v sinfo >/dev/null 2>&1 && [ -r "$SLURM_CONF" ] && cluster_healthy "$node"; then
        log "cluster already up: node $node is $(node_state "$node"); nothing to do"
        sinfo
        return 0
    fi

    install_packages
    start_munge
    # slurm daemons are (re)started from scratch so that they read the config written now
    stop_slurm_daemons
    start_mariadb
    local pass
    pass=$(db_password)
    setup_database "$pass"
    write_configs "$node" "$pass"
    start_slurm "$node"
    log "cluster up: node $node is idle ($(( SECONDS - t0 ))s)"
    sinfo
    if [ $verify_after -eq 1 ]; then
        verify "$node"
    fi
    log "done in $(( SECONDS - t0 ))s"
}

main "$@"
