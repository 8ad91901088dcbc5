#!/usr/bin/env bash
# A private single-node SLURM cluster on loopback (127.0.0.1), for tests and CI.
#
#   bash scripts/slurm-cluster.sh install   # apt-get the Debian bookworm packages (root)
#   bash scripts/slurm-cluster.sh start     # start MariaDB, munge, slurmdbd, slurmctld, slurmd
#   bash scripts/slurm-cluster.sh env       # print the line to eval: export SLURM_CONF=...
#   bash scripts/slurm-cluster.sh status    # which daemons run, and sinfo
#   bash scripts/slurm-cluster.sh stop      # cancel our jobs, stop our daemons (by PID file)
#   bash scripts/slurm-cluster.sh clean     # stop, then delete the state directory
#
# Everything lives in $PCBENCH_SLURM_DIR (default /tmp/pcbench-slurm): configs, munge key and
# socket, MariaDB datadir, slurm state/spool/logs, PID files, and env.sh (the export line).
# `start` prints only the export line on stdout (progress goes to stderr), so
#   eval "$(bash scripts/slurm-cluster.sh start)"
# works. The daemons use non-default ports (slurmctld 16817, slurmd 16818, slurmdbd 16819,
# MariaDB 16820; override with PCBENCH_SLURM_PORT_BASE) and never the system's munge socket,
# so a system SLURM/munge/MariaDB is left alone. `stop` only signals the PIDs in our PID files,
# after checking that each PID is still the program we started.
# State (accounting DB and slurmctld state, hence job ids) persists across stop/start; `clean`
# wipes it. Cluster name: pcbench, partition: debug (the default), one node = this machine
# (CPUs = nproc, RealMemory = 90 % of RAM, no GPUs/GRES). SelectTypeParameters=CR_CPU: memory
# is not a consumable, so jobs share the node by CPU only; EnforcePartLimits=ALL makes requests
# the node can never satisfy (too many CPUs/nodes, --mem above RealMemory) fail at submission
# instead of pending forever. A requeued job becomes eligible again after ~11 s (cred_expire+1).
set -euo pipefail

D=${PCBENCH_SLURM_DIR:-/tmp/pcbench-slurm}
case "$D" in /*) ;; *) D="$(pwd)/$D" ;; esac
D=${D%/}
PORT_BASE=${PCBENCH_SLURM_PORT_BASE:-16817}
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
CLUSTER=pcbench
PARTITION=debug
ACCOUNT=pcbench
START_TIMEOUT=${PCBENCH_SLURM_START_TIMEOUT:-90}

ETC=$D/etc
RUN=$D/run
LOG=$D/log
MUNGE_SOCK_DIR=$D/munge-run
MUNGE_SOCK=$MUNGE_SOCK_DIR/munge.socket.2
DB_SOCK=$D/mysql/mysqld.sock
DB_DATA=$D/mysql/data
SLURM_CONF_FILE=$ETC/slurm.conf
MARKER=$D/.pcbench-slurm

# Daemons, in start order: name, PID file, expected executable basenames (for the PID check).
DAEMONS=(mariadb munged slurmdbd slurmctld slurmd)
pidfile_of() {
  # munged runs as the munge user and removes its own PID file: keep it in its own dir.
  if [ "$1" = munged ]; then echo "$MUNGE_SOCK_DIR/munged.pid"; else echo "$RUN/$1.pid"; fi
}
exe_ok() {  # exe_ok NAME EXE_BASENAME
  case "$1" in
    mariadb) [[ $2 == mariadbd || $2 == mysqld ]] ;;
    munged) [[ $2 == munged ]] ;;
    slurmdbd) [[ $2 == slurmdbd ]] ;;
    slurmctld) [[ $2 == slurmctld || $2 == slurmctld-wlm ]] ;;
    slurmd) [[ $2 == slurmd || $2 == slurmd-wlm ]] ;;
    *) return 1 ;;
  esac
}

log() { echo "[slurm-cluster] $*" >&2; }
die() { echo "[slurm-cluster] ERROR: $*" >&2; exit 1; }

env_line() {
  echo "export SLURM_CONF=$SLURM_CONF_FILE PCBENCH_SLURM_DIR=$D"
}

# PID of daemon NAME if its PID file names a live process running the expected program; else empty.
daemon_pid() {
  local name=$1 f pid exe info
  f=$(pidfile_of "$name")
  [ -s "$f" ] || return 0
  pid=$(tr -dc '0-9' <"$f" 2>/dev/null || true)
  [ -n "$pid" ] || return 0
  [ -d "/proc/$pid" ] || return 0
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  exe=${exe% (deleted)}
  exe_ok "$name" "$(basename "${exe:-x}")" || return 0
  # ... and one of ours: its command line (datadir, socket, -f slurm.conf) or its environment
  # (SLURM_CONF, which we set for every slurm daemon) names our state dir.
  info=$(cat "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null | tr '\0' '\n' || true)
  [[ $info == *"$D/"* ]] || return 0
  echo "$pid"
}

all_running() {
  local n
  for n in "${DAEMONS[@]}"; do
    [ -n "$(daemon_pid "$n")" ] || return 1
  done
}

need_cmds() {
  local c missing=()
  for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  [ ${#missing[@]} -eq 0 ] || die "missing commands: ${missing[*]} (run: bash $0 install)"
}

# ---------------------------------------------------------------------------------------------
cmd_install() {
  local pkgs=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server) missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "packages already installed: ${pkgs[*]}"
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "install needs root (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' init scripts from starting the system daemons (we run private ones).
  local added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# temporary, from pcbench scripts/slurm-cluster.sh install\nexit 101\n' \
      >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    added_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  log "apt-get install ${missing[*]}"
  apt-get update -q </dev/null
  apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" </dev/null
  if [ $added_policy -eq 1 ]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  log "installed: ${missing[*]}"
}

# ---------------------------------------------------------------------------------------------
write_configs() {
  local host cpus mem_kb real_mem dbpass
  host=$(hostname -s)
  cpus=$(nproc)
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  # RealMemory a bit under the machine's memory (slurmd drains a node that has less than
  # configured): 90 %, and at least 512 MB less.
  real_mem=$((mem_kb * 9 / 10 / 1024))
  [ $((mem_kb / 1024 - real_mem)) -ge 512 ] || real_mem=$((mem_kb / 1024 - 512))
  [ "$real_mem" -ge 256 ] || real_mem=256
  dbpass=$(cat "$ETC/db.pass")
  # slurmdbd (22.05) has no DbdAddr-based bind: with NoInAddrAny it binds to the address that
  # gethostname() resolves to, else to 0.0.0.0. Use NoInAddrAny (and talk to that address) when
  # it is a loopback address (127.0.0.1, or Debian's 127.0.1.1), otherwise fall back to 0.0.0.0
  # (requests still need our private munge key).
  # Likewise srun's listening sockets. (slurmctld and slurmd bind to the explicit 127.0.0.1.)
  local dbd_addr dbd_comm slurm_comm
  dbd_addr=$(getent ahostsv4 "$(hostname)" 2>/dev/null | awk 'NR==1 {print $1}')
  if [[ $dbd_addr == 127.* ]]; then
    dbd_comm="CommunicationParameters=NoInAddrAny"
    slurm_comm="CommunicationParameters=NoInAddrAny,NoCtldInAddrAny"
  else
    log "WARNING: hostname $(hostname) resolves to '${dbd_addr:-nothing}', not loopback:" \
      "slurmdbd/slurmd will listen on 0.0.0.0 (munge-authenticated with our private key)"
    dbd_addr=127.0.0.1
    dbd_comm="# CommunicationParameters=NoInAddrAny omitted: hostname is not loopback"
    slurm_comm="CommunicationParameters=NoCtldInAddrAny"
  fi

  umask 022
  cat >"$SLURM_CONF_FILE.tmp" <<EOF
# Generated by scripts/slurm-cluster.sh -- private loopback test cluster. Do not edit.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
$slurm_comm
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd
SlurmctldPidFile=$(pidfile_of slurmctld)
SlurmdPidFile=$(pidfile_of slurmd)
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=5,kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$dbd_addr
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
JobRequeue=1
EnforcePartLimits=ALL
ReturnToService=2
KillWait=5
MinJobAge=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
Waittime=0
MaxArraySize=10001
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$SLURM_CONF_FILE.tmp" "$SLURM_CONF_FILE"

  umask 077
  cat >"$ETC/slurmdbd.conf.tmp" <<EOF
# Generated by scripts/slurm-cluster.sh -- private loopback test cluster. Do not edit.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
DbdHost=$host
DbdAddr=$dbd_addr
$dbd_comm
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pidfile_of slurmdbd)
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf.tmp"
  mv "$ETC/slurmdbd.conf.tmp" "$ETC/slurmdbd.conf"
  umask 022
  # Only read by cgroup plugins (not used here), but keeps slurmd from looking in /etc/slurm.
  cat >"$ETC/cgroup.conf" <<EOF
# Generated by scripts/slurm-cluster.sh (cgroup plugins are not used by this cluster).
CgroupPlugin=autodetect
IgnoreSystemd=yes
EOF
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...  (true once COMMAND succeeds)
  local t=$1 i
  shift 2
  for ((i = 0; i < t * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  return 1
}

fail_start() {
  log "start failed: $*"
  local f
  for f in "$LOG"/*.log; do
    [ -s "$f" ] || continue
    echo "----- tail $f -----" >&2
    tail -n 25 "$f" >&2 || true
  done
  cmd_stop >&2 || true
  exit 1
}

start_mariadb() {
  [ -n "$(daemon_pid mariadb)" ] && return 0
  local mariadbd install_db fresh=0
  mariadbd=$(command -v mariadbd || command -v mysqld || echo /usr/sbin/mariadbd)
  [ -x "$mariadbd" ] || die "mariadbd not found (run: bash $0 install)"
  install_db=$(command -v mariadb-install-db || command -v mysql_install_db || true)
  if [ ! -d "$DB_DATA/mysql" ]; then
    [ -n "$install_db" ] || die "mariadb-install-db not found"
    log "initialising MariaDB datadir $DB_DATA"
    rm -rf "$DB_DATA"
    mkdir -p "$DB_DATA"
    "$install_db" --no-defaults --datadir="$DB_DATA" --user=root --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 ||
      fail_start "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    fresh=1
  fi
  rm -f "$DB_SOCK" "$(pidfile_of mariadb)"
  setsid "$mariadbd" --no-defaults --user=root --datadir="$DB_DATA" --socket="$DB_SOCK" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$(pidfile_of mariadb)" \
    --log-error="$LOG/mariadb.log" --skip-name-resolve --skip-log-bin \
    --innodb-buffer-pool-size=128M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
    --innodb-flush-log-at-trx-commit=2 --max-allowed-packet=16M \
    </dev/null >>"$LOG/mariadb.log" 2>&1 9>&- &
  local mpid=$! i
  for ((i = 0; ; i++)); do
    mariadb --no-defaults --socket="$DB_SOCK" -uroot -e 'SELECT 1' >/dev/null 2>&1 && break
    kill -0 "$mpid" 2>/dev/null || fail_start "MariaDB exited (port $DB_PORT in use?)"
    [ "$i" -lt 300 ] || fail_start "MariaDB did not come up in 60 s"
    sleep 0.2
  done
  wait_for 10 "MariaDB pid file" test -s "$(pidfile_of mariadb)" || fail_start "MariaDB wrote no PID file"
  # (Re)create the slurm DB user every time: cheap, and fixes a datadir whose password differs.
  local pass
  pass=$(cat "$ETC/db.pass")
  mariadb --no-defaults --socket="$DB_SOCK" -uroot <<EOF || fail_start "could not create the slurm DB user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
  [ $fresh -eq 0 ] || log "MariaDB initialised"
}

start_munge() {
  [ -n "$(daemon_pid munged)" ] && return 0
  id munge >/dev/null 2>&1 || die "no 'munge' user (run: bash $0 install)"
  install -d -m 0700 -o munge -g munge "$D/munge"
  install -d -m 0755 -o munge -g munge "$MUNGE_SOCK_DIR"
  if [ ! -s "$D/munge/munge.key" ]; then
    dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
  fi
  chown munge:munge "$D/munge/munge.key"
  chmod 0400 "$D/munge/munge.key"
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock" "$(pidfile_of munged)"
  touch "$LOG/munged.log"
  chown munge:munge "$LOG/munged.log"
  # munged runs as the munge user; it checks that the key/socket/log dirs are not writable by
  # others, which holds for our dirs (0700/0755) under a sticky /tmp.
  runuser -u munge -- munged --force --socket="$MUNGE_SOCK" --key-file="$D/munge/munge.key" \
    --pid-file="$(pidfile_of munged)" --log-file="$LOG/munged.log" \
    --seed-file="$D/munge/munged.seed" </dev/null >>"$LOG/munged.log" 2>&1 9>&- ||
    fail_start "munged failed to start"
  wait_for 10 "munge" bash -c "munge -n -S '$MUNGE_SOCK' | unmunge -S '$MUNGE_SOCK'" ||
    fail_start "munge does not answer on $MUNGE_SOCK"
}

start_slurmdbd() {
  [ -n "$(daemon_pid slurmdbd)" ] && return 0
  rm -f "$(pidfile_of slurmdbd)"
  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF.
  SLURM_CONF=$SLURM_CONF_FILE slurmdbd </dev/null >>"$LOG/slurmdbd.log" 2>&1 9>&- ||
    fail_start "slurmdbd failed to start"
  wait_for 60 "slurmdbd" sacctmgr -n list cluster || fail_start "slurmdbd does not answer"
}

register_accounting() {
  local user
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail_start "sacctmgr add cluster failed"
  fi
  if ! sacctmgr -n -P list account "$ACCOUNT" format=account | grep -qx "$ACCOUNT"; then
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="pcbench tests" \
      Organization=pcbench >/dev/null || fail_start "sacctmgr add account failed"
  fi
  for user in root ${SUDO_USER:-}; do
    if ! sacctmgr -n -P list user "$user" format=user | grep -qx "$user"; then
      sacctmgr -i add user "$user" Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null ||
        fail_start "sacctmgr add user $user failed"
    fi
  done
}

start_slurmctld() {
  [ -n "$(daemon_pid slurmctld)" ] && return 0
  rm -f "$(pidfile_of slurmctld)"
  SLURM_CONF=$SLURM_CONF_FILE slurmctld -f "$SLURM_CONF_FILE" \
    </dev/null >>"$LOG/slurmctld.log" 2>&1 9>&- ||
    fail_start "slurmctld failed to start"
  wait_for 60 "slurmctld" scontrol ping || fail_start "slurmctld does not answer"
  wait_for 30 "slurmctld" bash -c "scontrol ping | grep -q UP" || fail_start "slurmctld not UP"
}

start_slurmd() {
  [ -n "$(daemon_pid slurmd)" ] && return 0
  rm -f "$(pidfile_of slurmd)"
  SLURM_CONF=$SLURM_CONF_FILE slurmd -f "$SLURM_CONF_FILE" -N "$(hostname -s)" \
    </dev/null >>"$LOG/slurmd.log" 2>&1 9>&- || fail_start "slurmd failed to start"
}

node_idle() {
  local s
  s=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1)
  [[ $s == idle || $s == mixed || $s == allocated ]]
}

# Like node_idle, but resumes a node left DRAINED/DOWN by a previous run's saved state
# (ReturnToService=2 only returns DOWN nodes once slurmd registers).
node_idle_or_resume() {
  local s
  node_idle && return 0
  s=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1)
  case "$s" in
    drain* | down* | fail*)
      scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
      ;;
  esac
  return 1
}

cmd_start() {
  if [ -f "$MARKER" ] && all_running && SLURM_CONF=$SLURM_CONF_FILE node_idle; then
    log "already running"
    env_line >"$D/env.sh"
    env_line
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "start needs root (daemons run as root/munge)"
  need_cmds slurmctld slurmd slurmdbd munged munge unmunge sinfo sacct sacctmgr scontrol mariadb runuser
  local t0=$SECONDS
  # Something partially running: stop what is ours, then start everything cleanly.
  local n
  for n in "${DAEMONS[@]}"; do
    if [ -n "$(daemon_pid "$n")" ]; then
      log "partially running: restarting"
      cmd_stop >&2
      break
    fi
  done
  umask 022
  mkdir -p "$D"
  touch "$MARKER"
  mkdir -p "$ETC" "$RUN" "$LOG" "$D/state" "$D/spool/slurmd" "$D/mysql"
  chmod 0755 "$D" "$RUN" "$LOG"
  local f
  for f in "$LOG"/*.log; do  # keep the previous run's logs as *.log.prev
    [ -e "$f" ] && mv -f "$f" "$f.prev"
  done
  if [ ! -s "$ETC/db.pass" ]; then
    (umask 077 && head -c 48 /dev/urandom | od -An -tx1 | tr -d ' \n' | head -c 32 >"$ETC/db.pass")
  fi
  chmod 600 "$ETC/db.pass"
  write_configs
  export SLURM_CONF=$SLURM_CONF_FILE

  log "starting MariaDB on 127.0.0.1:$DB_PORT"
  start_mariadb
  log "starting munged ($MUNGE_SOCK)"
  start_munge
  log "starting slurmdbd on 127.0.0.1:$DBD_PORT"
  start_slurmdbd
  register_accounting
  log "starting slurmctld on 127.0.0.1:$CTLD_PORT"
  start_slurmctld
  log "starting slurmd on 127.0.0.1:$SLURMD_PORT"
  start_slurmd

  wait_for "$START_TIMEOUT" "node idle" node_idle_or_resume || {
    sinfo -N -l >&2 || true
    scontrol show node >&2 || true
    fail_start "node did not become idle"
  }
  wait_for 30 "sacct" sacct -n -X -S now-1minutes || fail_start "sacct does not answer"
  env_line >"$D/env.sh"
  log "cluster up in $((SECONDS - t0)) s (state dir $D)"
  env_line
}

# ---------------------------------------------------------------------------------------------
stop_daemon() {  # stop_daemon NAME [TIMEOUT_S]
  local name=$1 timeout=${2:-30} pid i
  pid=$(daemon_pid "$name")
  if [ -z "$pid" ]; then
    rm -f "$(pidfile_of "$name")"
    return 0
  fi
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < timeout * 10; i++)); do
    [ -d "/proc/$pid" ] || break
    # A zombie has exited; nothing more to wait for (its parent reaps it).
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || break
    sleep 0.1
  done
  if [ -d "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then
    log "$name (pid $pid) did not exit after ${timeout}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  fi
  rm -f "$(pidfile_of "$name")"
}

cmd_stop() {
  if [ ! -d "$D" ]; then
    log "nothing to stop ($D does not exist)"
    return 0
  fi
  export SLURM_CONF=$SLURM_CONF_FILE
  # Cancel the jobs of our cluster first so that no slurmstepd/job of ours outlives slurmd.
  if [ -n "$(daemon_pid slurmctld)" ] && [ -f "$SLURM_CONF_FILE" ]; then
    local jobs i
    jobs=$(squeue -h -o '%A' 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 150; i++)); do
        [ -z "$(squeue -h -o '%A' -t all 2>/dev/null | head -n1)" ] && break
        [ -z "$(squeue -h -o '%A' -t RUNNING,COMPLETING,CONFIGURING 2>/dev/null | head -n1)" ] && break
        sleep 0.2
      done
    fi
  fi
  local i
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    stop_daemon "${DAEMONS[$i]}" 30
  done
  rm -f "$D/env.sh"
  log "stopped"
}

cmd_status() {
  local n pid rc=0
  for n in "${DAEMONS[@]}"; do
    pid=$(daemon_pid "$n")
    if [ -n "$pid" ]; then
      echo "$n: running (pid $pid)"
    else
      echo "$n: not running"
      rc=3
    fi
  done
  if [ -f "$SLURM_CONF_FILE" ] && [ -n "$(daemon_pid slurmctld)" ]; then
    SLURM_CONF=$SLURM_CONF_FILE sinfo || rc=3
  fi
  return $rc
}

cmd_env() {
  env_line
}

cmd_clean() {
  cmd_stop
  if [ -d "$D" ]; then
    [ -f "$MARKER" ] || die "$D has no $MARKER marker: not deleting it"
    rm -rf "$D"
    log "removed $D"
  fi
}

# Serialise start/stop/clean on the same state dir. The lock is fd 9: every daemon is started
# with 9>&- so that it does not inherit (and hold) the lock.
with_lock() {
  if command -v flock >/dev/null 2>&1 && { exec 9>>"$D.lock"; } 2>/dev/null; then
    flock -w 300 9 || die "could not lock $D.lock"
  fi
  "$@"
}

case "${1:-}" in
  install) cmd_install ;;
  start) with_lock cmd_start ;;
  stop) with_lock cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  clean) with_lock cmd_clean ;;
  *)
    echo "usage: $0 {install|start|stop|status|env|clean}" >&2
    exit 2
    ;;
esac
