#!/usr/bin/env bash
# One command on a fresh Ubuntu GPU instance: mount the ImageNet volume, install, update the code and
# start (or resume) ResNet-50 training detached. Safe to rerun. Run with --help for the options.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: setup_and_train.sh [options] [--] [train.py options]

Mounts the data volume at $MOUNT_POINT (default /mnt/imagenet), adds it to /etc/fstab, creates a venv
on it, gets or updates the code, and starts `python train.py` in a tmux session (nohup if tmux is
missing). Rerunning it resumes training: train.py picks up its last checkpoint in the output dir.
On an NVIDIA GPU box the venv gets the PyTorch build that the driver (nvidia-smi) runs, and train.py starts
only once that PyTorch runs on every GPU nvidia-smi lists; a venv whose PyTorch no longer suits the driver
is reinstalled.

Options:
  --device /dev/NAME       data disk to use (default: the largest unmounted, non-root EBS disk;
                           zram, ram, loop and empty devices are never picked)
  --format-empty-disk      allow mkfs.ext4 on the chosen disk, only if it is completely empty
                           (no filesystem or partition table and the first MiB all zeros)
  --local-changes MODE     what to do with uncommitted changes in the checkout before updating it:
                             keep    leave the checkout as it is, do not update (default when not
                                     run from a terminal)
                             reset   discard them (runs/, data/ and *.pth files are kept)
                             backup  save them to $MOUNT_POINT/backups/*.tar.gz, then reset
                             merge   update and re-apply them (git pull --autostash)
                           Asked interactively when stdin is a terminal.
  --repo-url URL           where to clone the code if this script is not inside a checkout
                           (env REPO_URL; default: origin of the checkout the script sits in)
  --output-dir DIR         checkpoints and logs (env OUTPUT_DIR; default: train.py's own, so that a bare
                           `python train.py` resumes the same run: runs/resnet50 on the data volume,
                           $MOUNT_POINT/runs/resnet50, which outlives a spot instance's root volume; or
                           runs/resnet50 in the code folder when the data is not on a mounted volume
                           or a run already lives there)
  --session NAME           tmux session name (env SESSION; default resnet50)
  --demo                   no ImageNet: skip disk and mount work, run `train.py --demo`
  --on-boot                also install a systemd service that resumes this run, with these options, after
                           every boot (a spot stop and start, a reboot): it waits for the data volume, then
                           starts train.py in the same tmux session. A run that finished, stopped on a
                           non-finite loss (exit 3) or was refused (exit 2) is left alone.
  --no-on-boot             remove that service (for --session NAME) and exit
  --dry-run                print every action, change nothing
  -h, --help               this help

Everything after `--`, and any option not listed above, is passed to train.py, for example
  ./setup_and_train.sh -- --epochs 90 --batch-size 256
train.py reads the data from $DATASET_PATH (default $MOUNT_POINT/extracted; see prepare_imagenet.py).

After starting train.py the script waits until it has passed its start-up checks (its log shows the
"Training ..." line) or ended; if it failed, the script prints the log's last lines and exits with
train.py's status. A start-up still going after STARTUP_WAIT_SECONDS (default 300) is left running.

Environment for tests: MOUNT_POINT, FSTAB (default /etc/fstab), DEV_DIR (default /dev), VENV,
SYSTEMD_RUN_DIR (default /run/systemd/system: present where systemd runs), UNIT_DIR (default
/etc/systemd/system), BOOT_WAIT_SECONDS (default 900: how long a boot waits for the data volume).
EOF
}

MOUNT_POINT=${MOUNT_POINT:-/mnt/imagenet}
FSTAB=${FSTAB:-/etc/fstab}
DEV_DIR=${DEV_DIR:-/dev}
SESSION=${SESSION:-resnet50}
STARTUP_WAIT_SECONDS=${STARTUP_WAIT_SECONDS:-300}
SYSTEMD_RUN_DIR=${SYSTEMD_RUN_DIR:-/run/systemd/system}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
BOOT_WAIT_SECONDS=${BOOT_WAIT_SECONDS:-900}
ON_BOOT=""
AT_BOOT=0
DEVICE=""
FORMAT_EMPTY=0
LOCAL_CHANGES=""
DRY_RUN=0
MOUNT_PENDING=0
DEMO=0
PASSTHROUGH=()
SUDO=""
if [[ $EUID -ne 0 ]]; then SUDO=sudo; fi

say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Every command that changes something goes through run, so --dry-run can print it instead.
run() {
    if ((DRY_RUN)); then
        printf '[dry-run] %s\n' "$*"
    else
        printf '+ %s\n' "$*"
        "$@"
    fi
}

need_value() {
    [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)."
}

parse_args() {
    while (($#)); do
        case $1 in
            --device) need_value "$@"; DEVICE=$2; shift 2 ;;
            --format-empty-disk) FORMAT_EMPTY=1; shift ;;
            --local-changes)
                need_value "$@"
                case $2 in keep | reset | backup | merge) LOCAL_CHANGES=$2 ;;
                    *) die "--local-changes must be keep, reset, backup or merge, not '$2'." ;;
                esac
                shift 2 ;;
            --repo-url) need_value "$@"; REPO_URL=$2; shift 2 ;;
            --output-dir) need_value "$@"; OUTPUT_DIR=$2; shift 2 ;;
            --session) need_value "$@"; SESSION=$2; shift 2 ;;
            --demo) DEMO=1; shift ;;
            --on-boot) ON_BOOT=install; shift ;;
            --no-on-boot) ON_BOOT=remove; shift ;;
            --at-boot) AT_BOOT=1; shift ;;  # what the boot service runs (see install_on_boot)
            --dry-run) DRY_RUN=1; shift ;;
            -h | --help) usage; exit 0 ;;
            --) shift; PASSTHROUGH+=("$@"); break ;;
            *) PASSTHROUGH+=("$1"); shift ;;
        esac
    done
}

# ------------------------------------------------------------------------------------------ disk
# lsblk -P prints KEY="value" pairs; field reads one of them from such a line.
field() {
    local re="(^| )$2=\"([^\"]*)\""
    if [[ $1 =~ $re ]]; then printf '%s' "${BASH_REMATCH[2]}"; fi
}

declare -A PARENT=() SIZE=() TYPE=() FSTYPE=() MOUNTED=() MODEL=() BUSY=()
NAMES=()

read_lsblk() {
    local line name
    while IFS= read -r line; do
        [[ -n $line ]] || continue
        name=$(field "$line" NAME)
        NAMES+=("$name")
        PARENT[$name]=$(field "$line" PKNAME)
        SIZE[$name]=$(field "$line" SIZE)
        TYPE[$name]=$(field "$line" TYPE)
        FSTYPE[$name]=$(field "$line" FSTYPE)
        MOUNTED[$name]=$(field "$line" MOUNTPOINT)
        MODEL[$name]=$(field "$line" MODEL)
    done < <(lsblk -P -b -o NAME,TYPE,SIZE,FSTYPE,MOUNTPOINT,PKNAME,MODEL)
    # A disk is busy when it or anything below it (partition, LVM, swap) is mounted.
    local n
    for name in "${NAMES[@]}"; do
        [[ -n ${MOUNTED[$name]} ]] || continue
        n=$name
        while [[ -n $n ]]; do BUSY[$n]=1; n=${PARENT[$n]:-}; done
    done
}

children_of() {
    local name
    for name in "${NAMES[@]}"; do
        if [[ ${PARENT[$name]} == "$1" ]]; then printf '%s\n' "$name"; fi
    done
}

pick_disk() {
    local name best="" skipped=()
    for name in "${NAMES[@]}"; do
        [[ ${TYPE[$name]} == disk && -z ${BUSY[$name]:-} ]] || continue
        # zram and ram disks live in memory and loop devices are files on another disk: none is a data
        # volume, and an unused one reports 0 bytes.
        case $name in zram* | ram* | loop*) continue ;; esac
        ((SIZE[$name] > 0)) || continue
        # Instance-store disks can be larger than the EBS volume but are wiped when the instance stops.
        if [[ ${MODEL[$name]} == *"Instance Storage"* ]]; then skipped+=("$name"); continue; fi
        if [[ -z $best ]] || ((SIZE[$name] > SIZE[$best])); then best=$name; fi
    done
    ((${#skipped[@]} == 0)) || say "not considering instance-store disk(s) ${skipped[*]}: they are erased on stop" >&2
    [[ -n $best ]] || die "No unmounted data disk found (lsblk lists only the root disk, mounted disks, or zram, \
ram, loop or empty devices). Attach the EBS volume to this instance (see ImageNet_Setup_Guide.md) or pass \
--device /dev/NAME."
    say "picked /dev/$best ($((SIZE[$best] / 1000000000)) GB, ${MODEL[$best]:-unknown model}), the largest \
unmounted non-root disk; use --device to choose another" >&2
    printf '%s' "$best"
}

# blkid -p reads the superblocks directly, so a disk formatted a moment ago is seen too.
probe() {
    local rc=0 out
    out=$($SUDO blkid -p -o export "$DEV_DIR/$1") || rc=$?
    # 2 means "nothing found"; anything else is a real failure (e.g. no permission).
    ((rc == 0 || rc == 2)) || die "blkid could not read $DEV_DIR/$1 (exit $rc)."
    printf '%s\n' "$out"
}

probe_value() {
    probe "$1" | sed -n "s/^$2=//p"
}

# Empty means: no partitions, nothing blkid recognizes (filesystem, RAID, LVM, partition table) and
# the first MiB all zeros, where every common format keeps its signature.
is_empty_disk() {
    local dev=$DEV_DIR/$1
    [[ -z $(children_of "$1") ]] || return 1
    local signatures
    signatures=$(probe "$1") || exit 1
    [[ -z $signatures ]] || return 1
    $SUDO cmp -s -n 1048576 "$dev" /dev/zero
}

ensure_fstab() {
    local dev=$1 uuid fstype
    uuid=$(probe_value "$dev" UUID)
    fstype=$(probe_value "$dev" TYPE)
    if [[ -z $uuid ]]; then
        ((DRY_RUN)) && { say "[dry-run] would add an fstab entry once the disk has a filesystem"; return; }
        die "$DEV_DIR/$dev has no filesystem UUID; cannot add it to $FSTAB."
    fi
    if [[ -f $FSTAB ]] && awk -v mp="$MOUNT_POINT" -v id="UUID=$uuid" \
        '$1 !~ /^#/ && ($2 == mp || $1 == id) { found = 1 } END { exit !found }' "$FSTAB"; then
        say "$FSTAB already has an entry for $MOUNT_POINT or UUID=$uuid"
        return
    fi
    # nofail: the instance still boots if the volume is detached.
    local entry="UUID=$uuid $MOUNT_POINT $fstype defaults,nofail 0 2"
    if ((DRY_RUN)); then
        printf '[dry-run] append to %s: %s\n' "$FSTAB" "$entry"
    else
        printf '+ append to %s: %s\n' "$FSTAB" "$entry"
        printf '%s\n' "$entry" | $SUDO tee -a "$FSTAB" >/dev/null
    fi
}

setup_disk() {
    read_lsblk
    local name
    for name in "${NAMES[@]}"; do
        if [[ ${MOUNTED[$name]} == "$MOUNT_POINT" ]]; then
            say "$DEV_DIR/$name is already mounted at $MOUNT_POINT"
            ensure_fstab "$name"
            return
        fi
    done

    local disk target fstype parts
    if [[ -n $DEVICE ]]; then
        disk=${DEVICE##*/}
        [[ -n ${TYPE[$disk]:-} ]] || die "--device $DEVICE: lsblk does not list it. Devices: ${NAMES[*]}."
    else
        disk=$(pick_disk)
    fi
    [[ -z ${BUSY[$disk]:-} ]] || die "$DEV_DIR/$disk (or a partition on it) is already mounted elsewhere; \
refusing to touch it. Pick another disk with --device."
    target=$disk
    mapfile -t parts < <(children_of "$disk")
    if ((${#parts[@]} == 1)) && [[ -n ${FSTYPE[${parts[0]}]} ]]; then
        target=${parts[0]}
    elif ((${#parts[@]} > 0)); then
        die "$DEV_DIR/$disk has ${#parts[@]} partitions; pass the one to mount with --device /dev/PARTITION."
    fi

    fstype=$(probe_value "$target" TYPE)
    if [[ -z $fstype ]]; then
        if ! is_empty_disk "$target"; then
            die "$DEV_DIR/$target holds data but no filesystem that blkid recognizes. Refusing to format or \
mount it. Inspect it with 'sudo file -s $DEV_DIR/$target' and pass --device for another disk."
        fi
        ((FORMAT_EMPTY)) || die "$DEV_DIR/$target is empty (no filesystem). To format it as ext4, rerun \
with --format-empty-disk (this creates a new filesystem on $DEV_DIR/$target)."
        # -m 0: a data-only volume needs no blocks reserved for root (5% of 500 GB is 25 GB).
        run $SUDO mkfs.ext4 -m 0 -L imagenet "$DEV_DIR/$target"
    elif ((FORMAT_EMPTY)); then
        say "$DEV_DIR/$target already has a $fstype filesystem: not formatting it"
    fi

    run $SUDO mkdir -p "$MOUNT_POINT"
    run $SUDO mount "$DEV_DIR/$target" "$MOUNT_POINT"
    if ((DRY_RUN)); then MOUNT_PENDING=1; fi
    ensure_fstab "$target"
    if ((!DRY_RUN)) && [[ ! -w $MOUNT_POINT ]]; then
        run $SUDO chown "$(id -u):$(id -g)" "$MOUNT_POINT"
    fi
}

# ------------------------------------------------------------------------------------------ code
in_checkout() { git -C "$1" rev-parse --show-toplevel 2>/dev/null; }

backup_changes() {
    local dir=$1 backups=$MOUNT_POINT/backups stamp tmp
    stamp=$(date +%Y%m%d-%H%M%S)
    ((DEMO)) && backups=$dir/../backups
    if ((DRY_RUN)); then
        say "[dry-run] would save git diff and untracked files (without runs/ data/ *.pth) to \
$backups/local-changes-$stamp.tar.gz"
        return
    fi
    tmp=$(mktemp -d)
    mkdir -p "$backups"
    git -C "$dir" diff HEAD --binary >"$tmp/changes.patch"
    git -C "$dir" ls-files -z --others --exclude-standard -- . ':!runs' ':!data' ':!*.pth' >"$tmp/untracked.list"
    tar -C "$dir" --null -T "$tmp/untracked.list" -cf "$tmp/untracked.tar"
    tar -C "$tmp" -czf "$backups/local-changes-$stamp.tar.gz" changes.patch untracked.tar
    rm -rf "$tmp"
    say "saved local changes to $backups/local-changes-$stamp.tar.gz (changes.patch + untracked.tar)"
}

discard_changes() {
    run git -C "$1" reset --hard HEAD
    # -e keeps checkpoints and data even where .gitignore does not cover them.
    run git -C "$1" clean -fd -e runs/ -e data/ -e '*.pth'
}

update_checkout() {
    local dir=$1 mode=$LOCAL_CHANGES
    if [[ -n $(git -C "$dir" status --porcelain) ]]; then
        if [[ -z $mode && -t 0 ]]; then
            git -C "$dir" status --short
            read -r -p "Local changes in $dir: keep / reset / backup / merge? [keep] " mode
            mode=${mode:-keep}
            case $mode in keep | reset | backup | merge) ;; *) die "unknown choice '$mode'." ;; esac
        elif [[ -z $mode ]]; then
            mode=keep
            say "local changes in $dir and no --local-changes given: keeping them and not updating the code"
        fi
        case $mode in
            keep) say "keeping local changes; the code is not updated"; return ;;
            backup) backup_changes "$dir"; discard_changes "$dir" ;;
            reset) discard_changes "$dir" ;;
            merge) ;;
        esac
    fi
    if ! git -C "$dir" rev-parse --abbrev-ref '@{upstream}' >/dev/null 2>&1; then
        warn "$dir has no upstream branch; not updating it."
        return
    fi
    local pull=(git -C "$dir" pull --ff-only)
    [[ $mode == merge ]] && pull=(git -C "$dir" pull --no-rebase --autostash)
    if ! run "${pull[@]}"; then
        [[ $mode == merge ]] && die "Updating $dir with your changes conflicted. Resolve it there \
(git status; your changes may be in 'git stash list') and rerun."
        warn "could not update $dir (offline or diverged?); continuing with the code as it is."
    fi
}

get_code() {
    local top
    if top=$(in_checkout "$SCRIPT_DIR"); then
        CODE_DIR=$top
        if ((AT_BOOT)); then
            say "at boot: continuing with the code in $CODE_DIR as it is (a run is not updated mid-way)"
            return
        fi
        say "updating the checkout this script is in: $CODE_DIR"
        update_checkout "$CODE_DIR"
        return
    fi
    CODE_DIR=${CODE_DIR:-$MOUNT_POINT/code}
    if [[ -d $CODE_DIR/.git ]]; then
        update_checkout "$CODE_DIR"
    else
        [[ $REPO_URL != *CHANGE-ME* ]] || die "This script is not inside a checkout, so it needs the \
repository URL: set REPO_URL or pass --repo-url."
        run git clone "$REPO_URL" "$CODE_DIR"
    fi
}

# ------------------------------------------------------------------------------------------ python
# PyPI's torch is the CUDA 13.0 build, which sees no GPU on a driver older than 580. nvidia_driver.py reads the
# driver and the GPUs (nvidia-smi) and names the build on PyTorch's own index that runs on them:
#   driver 580 or newer, every GPU Turing (compute capability 7.5) or newer  -> cu130, the build PyPI serves
#   driver 525.60.13 to 579, or a Maxwell, Pascal or Volta GPU (V100)        -> cu126, the last CUDA 12 build
#   anything else (an older driver, Blackwell on a driver below 580)         -> refused, with the driver to install
# (BUILDS there says why these two of the builds torch 2.14 has). Empty: no NVIDIA GPU, PyPI's build as always.
TORCH_INDEX=""

# train.py's ways to mean the CPU, given to this script: `-- --device cpu`, or CUDA_VISIBLE_DEVICES set empty.
wants_cpu() {
    [[ ${CUDA_VISIBLE_DEVICES+set} == set && -z $CUDA_VISIBLE_DEVICES ]] && return 0
    local i
    for ((i = 0; i < ${#PASSTHROUGH[@]}; i++)); do
        [[ ${PASSTHROUGH[i]} == --device=cpu ]] && return 0
        [[ ${PASSTHROUGH[i]} == --device && ${PASSTHROUGH[i + 1]:-} == cpu ]] && return 0
    done
    return 1
}

choose_torch_build() {
    if wants_cpu; then
        say "train.py is told to use the CPU: PyPI's PyTorch build, no GPU check"
        return
    fi
    if ((DRY_RUN)) && [[ ! -f $CODE_DIR/nvidia_driver.py ]]; then
        say "[dry-run] the PyTorch build for this machine's NVIDIA driver is chosen once the code is cloned"
        return
    fi
    # Exits with its status where no build runs on this driver; it has said why.
    TORCH_INDEX=$(python3 -B "$CODE_DIR/nvidia_driver.py" build) || exit $?
    [[ -z $TORCH_INDEX ]] || return 0
    local hardware problem="nvidia-smi is not installed"
    hardware=$(lspci -nn 2>/dev/null | grep -E '\[030[0-2]\]:.*\[10de:' | head -n 1) || true
    if [[ -n $hardware ]]; then
        if command -v nvidia-smi >/dev/null; then
            problem="nvidia-smi fails: $(nvidia-smi 2>&1 | head -n 1)"
        fi
        die "This machine has NVIDIA hardware (${hardware#* }) but no working NVIDIA driver ($problem), so \
PyTorch would see no GPU and train.py would run on the CPU. Install a driver and reboot: on Ubuntu \
'sudo apt-get update && sudo apt-get install -y nvidia-driver-580-server' (or 'sudo ubuntu-drivers install \
--gpgpu'), then 'sudo reboot' and rerun this script. After a kernel update, a reboot alone often brings back a \
driver that was installed. A GPU image with the driver installed (AWS's Deep Learning Base AMI, for one) \
avoids this step. To train on the CPU on purpose, rerun with '-- --device cpu'."
    fi
    say "no NVIDIA driver or GPU found: PyPI's PyTorch build; train.py will run on the CPU"
}

# The torch and torchvision lines of requirements.txt: the build comes in a version the code admits.
install_torch_build() {
    local specs
    mapfile -t specs < <(grep -E '^(torch|torchvision)([<>=!~ ;[]|$)' "$CODE_DIR/requirements.txt")
    # An installed torch of another build satisfies the same versions, and pip would keep it.
    run "$VENV/bin/pip" uninstall -y torch torchvision
    run "$VENV/bin/pip" install "${specs[@]}" --index-url "$TORCH_INDEX"
}

venv_torch_runs_on_gpus() {
    "$VENV/bin/python" -B "$CODE_DIR/nvidia_driver.py" check
}

setup_venv() {
    if [[ ! -x $VENV/bin/python ]]; then
        if ! python3 -c 'import ensurepip' 2>/dev/null; then
            run $SUDO apt-get update
            run $SUDO apt-get install -y python3-venv
        fi
        run python3 -m venv "$VENV"
    fi
    # Skipping an unchanged requirements.txt keeps reruns fast. The stamp names the build too: after a driver
    # change that needs another one, the venv is reinstalled.
    local stamp=$VENV/.requirements.sha256 sum installed=0
    sum="$(sha256sum "$CODE_DIR/requirements.txt" | cut -d' ' -f1)${TORCH_INDEX:+ $TORCH_INDEX}"
    if [[ -f $stamp && $(<"$stamp") == "$sum" ]]; then
        say "requirements.txt unchanged since the last install"
    else
        run "$VENV/bin/pip" install --upgrade pip
        if [[ -n $TORCH_INDEX ]]; then install_torch_build; fi
        run "$VENV/bin/pip" install -r "$CODE_DIR/requirements.txt"
        ((DRY_RUN)) || printf '%s\n' "$sum" >"$stamp"
        installed=1
    fi
    [[ -n $TORCH_INDEX ]] || return 0
    if ((DRY_RUN)); then
        say "[dry-run] would check that the venv's PyTorch runs on every GPU nvidia-smi lists"
        return
    fi
    venv_torch_runs_on_gpus && return
    if ((!installed)); then
        # A torch changed by hand since the last install: install the build once more and look again.
        say "the venv's PyTorch does not run on every GPU (above): installing the build for this driver again"
        install_torch_build
        venv_torch_runs_on_gpus && return
    fi
    printf 'error: %s\n' "PyTorch from $TORCH_INDEX, just installed in $VENV, does not run on every GPU \
nvidia-smi lists (the paragraph above says what it sees and why). Not starting train.py." >&2
    exit 2
}

# ------------------------------------------------------------------------------------------ boot
# --on-boot: a systemd service runs this script with --at-boot and the run's options after each boot. It runs
# once per boot (Type=oneshot, never restarted), and --at-boot itself starts train.py only when the run's last
# log says it neither finished nor stopped for a reason a restart cannot fix, so nothing can loop.
boot_unit() { printf 'train-%s.service' "$SESSION"; }
boot_script() { printf '%s/train-%s.boot.sh' "$UNIT_DIR" "$SESSION"; }

check_on_boot_possible() {
    [[ -d $SYSTEMD_RUN_DIR ]] || die "--on-boot installs a systemd service, but systemd is not running on this \
machine ($SYSTEMD_RUN_DIR does not exist; containers usually have no systemd). Leave out --on-boot and rerun \
this script by hand after a reboot."
    [[ $SESSION =~ ^[A-Za-z0-9_.-]+$ ]] || die "--on-boot names its service after the tmux session, so \
--session may only hold letters, digits, '.', '_' and '-', not '$SESSION'."
}

install_on_boot() {
    local unit script user
    unit=$(boot_unit)
    script=$(boot_script)
    user=$(id -un)
    local saved=(--at-boot --output-dir "$OUTPUT_DIR" --session "$SESSION")
    ((DEMO)) && saved+=(--demo)
    [[ -n $DEVICE ]] && saved+=(--device "$DEVICE")
    saved+=(-- "${PASSTHROUGH[@]}")
    # The boot command is a bash script, so the options and environment keep their exact words (%q), which a
    # unit file's own quoting rules would not guarantee.
    local body
    body="#!/bin/bash
# Written by setup_and_train.sh --on-boot and run by $unit at boot: resumes the run in $OUTPUT_DIR.
# Remove both: $CODE_DIR/setup_and_train.sh --no-on-boot --session $SESSION
export PATH=$(printf '%q' "$PATH") HOME=$(printf '%q' "${HOME:-}") MOUNT_POINT=$(printf '%q' "$MOUNT_POINT") \\
    DATASET_PATH=$(printf '%q' "$DATASET_PATH") VENV=$(printf '%q' "$VENV") FSTAB=$(printf '%q' "$FSTAB") \\
    DEV_DIR=$(printf '%q' "$DEV_DIR")
exec /bin/bash $(printf '%q' "$CODE_DIR/setup_and_train.sh") $(printf '%q ' "${saved[@]}")
"
    local unit_text="[Unit]
Description=Resume the training run in $OUTPUT_DIR (tmux session $SESSION) after a boot
Wants=network-online.target
After=network-online.target local-fs.target remote-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
User=$user
ExecStart=/bin/bash $script
# Waiting for a late data volume and train.py's start-up checks take as long as they take.
TimeoutStartSec=infinity
# At shutdown every process of the run gets SIGTERM: train.py saves a checkpoint on it, within this.
TimeoutStopSec=120

[Install]
WantedBy=multi-user.target
"
    if ((DRY_RUN)); then
        printf '[dry-run] write %s and %s, then: systemctl daemon-reload; systemctl enable %s\n' "$script" \
            "$UNIT_DIR/$unit" "$unit"
        return
    fi
    printf '+ write %s\n' "$script"
    printf '%s' "$body" | $SUDO tee "$script" >/dev/null
    printf '+ write %s\n' "$UNIT_DIR/$unit"
    printf '%s' "$unit_text" | $SUDO tee "$UNIT_DIR/$unit" >/dev/null
    run $SUDO systemctl daemon-reload
    run $SUDO systemctl enable "$unit"
}

remove_on_boot() {
    local unit script
    unit=$(boot_unit)
    script=$(boot_script)
    if [[ ! -f $UNIT_DIR/$unit ]]; then
        say "no boot service $unit is installed ($UNIT_DIR/$unit does not exist): nothing to remove"
        return
    fi
    run $SUDO systemctl disable "$unit"
    run $SUDO rm -f "$UNIT_DIR/$unit" "$script"
    run $SUDO systemctl daemon-reload
    say "removed $unit: the run no longer resumes by itself at boot (rerun this script to continue it)"
}

# The service starts before a slow EBS attachment may have been mounted (the fstab entry has nofail).
wait_for_volume() {
    local deadline=$((SECONDS + BOOT_WAIT_SECONDS)) said=0
    until mountpoint -q "$MOUNT_POINT"; do
        ((SECONDS < deadline)) || die "at boot: $MOUNT_POINT was not mounted within $BOOT_WAIT_SECONDS s, so the \
run was not resumed. Attach the data volume, mount it (sudo mount $MOUNT_POINT) and rerun setup_and_train.sh, \
or: sudo systemctl restart $(boot_unit)"
        ((said)) || say "at boot: waiting up to $BOOT_WAIT_SECONDS s for the data volume at $MOUNT_POINT"
        said=1
        sleep 1
    done
    say "at boot: $MOUNT_POINT is mounted"
}

# Whether the run's newest log lets a boot restart it: not after it finished, stopped on a non-finite loss or
# weights, or was refused. Otherwise (killed, stopped by a signal and saved, crashed) it resumes. The reason for
# leaving it alone goes to the journal (stdout) and to the end of that log.
resumable_at_boot() {
    local log status reason=""
    log=$(find "$OUTPUT_DIR/logs" -name 'train-*.log' 2>/dev/null | sort | tail -n 1)
    [[ -n $log ]] || return 0
    status=$(status_in_log "$log")
    case $status in
        2) reason="its last start was refused (exit status 2: a setting, the data or the checkpoint needs a fix; \
see the error above)" ;;
        3) reason="it stopped because the loss or the weights became non-finite (exit status 3); restarting \
would only repeat that. Lower --lr or change --precision, then rerun setup_and_train.sh" ;;
        0) if grep -q -e '^Training finished' -e 'This run is already finished' "$log"; then
               reason="it has finished"
           fi ;;
    esac
    [[ -n $reason ]] || return 0
    say "at boot: not restarting the run in $OUTPUT_DIR: $reason. Log: $log"
    printf '%s\n' "setup_and_train.sh at boot, $(date '+%F %T'): not restarted: $reason." >>"$log"
    return 1
}

# ------------------------------------------------------------------------------------------ train
# Asks the code for train.py's default output dir (dataset_paths.default_output_dir: on the data volume when
# the data is on a mounted one), so that this script and a bare `python train.py` always use the same run.
# Standard library only, so the system python3 answers before any venv exists.
default_output_dir() {
    DATASET_PATH=$DATASET_PATH python3 -B -c 'import sys; sys.path.insert(0, sys.argv[1]); import dataset_paths
print(dataset_paths.DEFAULT_OUTPUT_DIR)' "$CODE_DIR"
}

# train.py prints a line starting with "Training " once its start-up checks (data layout, flags,
# checkpoint) have passed. The tmux command appends EXIT_LINE and the status to the log when train.py ends.
EXIT_LINE="train.py exited with status"

status_in_log() {
    if [[ -f $1 ]]; then sed -n "s/^$EXIT_LINE \([0-9]*\)\$/\1/p" "$1" | tail -n 1; fi
}

show_log_end() {
    printf '%s\n' "---- last lines of $1 ----" >&2
    tail -n 25 "$1" >&2 || true
    printf '%s\n' "----" >&2
}

# Waits until train.py has passed its start-up checks or ended, so that a bad flag or a missing dataset
# is reported here, not discovered later in a detached session. $2 is the pid under nohup (a child of
# this shell, so `wait` gives its status); under tmux the status comes from the log.
wait_for_start() {
    local log=$1 pid=${2:-} status="" deadline=$((SECONDS + STARTUP_WAIT_SECONDS))
    while ((SECONDS < deadline)); do
        if grep -q '^Training ' "$log" 2>/dev/null; then
            sed '/^Training /q' "$log"
            say "train.py passed its start-up checks and is training"
            return 0
        fi
        if [[ -n $pid ]]; then
            if ! kill -0 "$pid" 2>/dev/null; then
                status=0
                wait "$pid" || status=$?
            fi
        else
            status=$(status_in_log "$log")
            if [[ -z $status ]] && ! tmux has-session -t "=$SESSION" 2>/dev/null; then
                sleep 0.5  # the session may end a moment after the status line is written
                status=$(status_in_log "$log")
                [[ -n $status ]] || status=unknown
            fi
        fi
        if [[ -n $status ]]; then
            show_log_end "$log"
            if [[ $status == 0 ]]; then
                say "train.py exited with status 0 before training: nothing to do (see its last lines above)"
                return 0
            fi
            printf 'error: %s\n' "train.py stopped during start-up (exit status $status); its last lines are \
above. Fix the cause and rerun this script with the same options." >&2
            [[ $status == unknown ]] && exit 1
            exit "$status"
        fi
        sleep 0.2
    done
    say "train.py is still starting after ${STARTUP_WAIT_SECONDS} s (no 'Training' line in its log yet); it keeps \
running. Follow it: tail -f $log"
}

start_training() {
    local cmd=("$VENV/bin/python" train.py --output-dir "$OUTPUT_DIR")
    ((DEMO)) && cmd+=(--demo)
    cmd+=("${PASSTHROUGH[@]}")
    if ((!DEMO)) && [[ ! -d $DATASET_PATH/train ]]; then
        warn "$DATASET_PATH/train does not exist: train.py will fail unless you pass --data-dir. Prepare \
the data with prepare_imagenet.py (see ImageNet_Setup_Guide.md)."
    fi
    local log
    log=$OUTPUT_DIR/logs/train-$(date +%Y%m%d-%H%M%S).log
    # Two starts within a second must not share a log, whose exit line is read back; the names sort by time.
    while [[ -e $log ]]; do
        sleep 1
        log=$OUTPUT_DIR/logs/train-$(date +%Y%m%d-%H%M%S).log
    done
    run mkdir -p "$OUTPUT_DIR/logs"

    if command -v tmux >/dev/null; then
        if tmux has-session -t "=$SESSION" 2>/dev/null; then
            say "tmux session '$SESSION' is already running; not starting another. Attach: tmux attach -t $SESSION"
            return
        fi
        local inner
        inner="cd $(printf '%q' "$CODE_DIR") && DATASET_PATH=$(printf '%q' "$DATASET_PATH") \
$(printf '%q ' "${cmd[@]}")2>&1 | tee -a $(printf '%q' "$log"); echo \"$EXIT_LINE \$?\" >>$(printf '%q' "$log")"
        run tmux new-session -d -s "$SESSION" "bash -o pipefail -c $(printf '%q' "$inner")"
        ((DRY_RUN)) || wait_for_start "$log"
        say "training runs in tmux session '$SESSION'. Attach: tmux attach -t $SESSION (detach: Ctrl-b d)"
    else
        local pidfile=$OUTPUT_DIR/train.pid
        if [[ -f $pidfile ]] && kill -0 "$(<"$pidfile")" 2>/dev/null; then
            say "training is already running (pid $(<"$pidfile")); not starting another. Log: $OUTPUT_DIR/logs/"
            return
        fi
        if ((DRY_RUN)); then
            printf '[dry-run] cd %s && DATASET_PATH=%s nohup %s >> %s 2>&1 &\n' "$CODE_DIR" "$DATASET_PATH" \
                "${cmd[*]}" "$log"
        else
            printf '+ nohup %s >> %s 2>&1 &\n' "${cmd[*]}" "$log"
            # exec all the way down: the pid in the pid file is train.py's own, for kill and for wait.
            (cd "$CODE_DIR" && DATASET_PATH=$DATASET_PATH exec nohup "${cmd[@]}" >>"$log" 2>&1) &
            local pid=$!
            echo "$pid" >"$pidfile"
            wait_for_start "$log" "$pid"
        fi
        say "tmux not found: training runs under nohup (pid file $pidfile)."
    fi
    say "log: $log   (follow it: tail -f $log)"
    say "to resume after a stop or reboot, run this script again with the same options"
}

main() {
    parse_args "$@"
    SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    local origin
    origin=$(git -C "$SCRIPT_DIR" remote get-url origin 2>/dev/null || true)
    REPO_URL=${REPO_URL:-${origin:-https://github.com/CHANGE-ME/resnet50-imagenet.git}}
    ((DRY_RUN)) && say "dry run: printing actions, changing nothing"
    if [[ $ON_BOOT == remove ]]; then
        remove_on_boot
        return
    fi
    [[ $ON_BOOT == install ]] && check_on_boot_possible

    if ((DEMO)); then
        say "demo mode: skipping disk and mount setup"
    elif ((AT_BOOT)); then
        wait_for_volume
    else
        setup_disk
    fi
    get_code
    DATASET_PATH=${DATASET_PATH:-$MOUNT_POINT/extracted}
    if ((DEMO)); then
        VENV=${VENV:-$CODE_DIR/venv}
        OUTPUT_DIR=${OUTPUT_DIR:-$CODE_DIR/runs/demo}
    else
        VENV=${VENV:-$MOUNT_POINT/venv}
        if [[ -z ${OUTPUT_DIR:-} ]]; then
            if ((DRY_RUN)) && [[ ! -f $CODE_DIR/dataset_paths.py ]]; then
                OUTPUT_DIR="<train.py's default output dir>"  # the code is not cloned yet
            else
                OUTPUT_DIR=$(default_output_dir) || die "Could not ask $CODE_DIR/dataset_paths.py for \
train.py's default output dir (is python3 installed?). Pass --output-dir."
            fi
        fi
        if ((MOUNT_PENDING)); then
            say "[dry-run] $MOUNT_POINT is not mounted yet, so the output dir shown is for the disks as they are; \
once it is mounted, the default is $MOUNT_POINT/runs/resnet50 for data on that volume"
        fi
    fi
    say "the run lives in $OUTPUT_DIR"
    if ((AT_BOOT)) && ! resumable_at_boot; then
        return
    fi
    choose_torch_build
    setup_venv
    start_training
    if [[ $ON_BOOT == install ]]; then
        install_on_boot
        say "installed $(boot_unit): after a reboot or a spot stop and start, this run resumes by itself in tmux \
session '$SESSION'. Remove it: ./setup_and_train.sh --no-on-boot --session $SESSION"
    elif [[ -f $UNIT_DIR/$(boot_unit) ]]; then
        say "$(boot_unit) resumes this run at boot (remove it: ./setup_and_train.sh --no-on-boot --session $SESSION)"
    elif [[ -d $SYSTEMD_RUN_DIR ]]; then
        say "to have this run resume by itself after a reboot or a spot stop and start, rerun with --on-boot"
    fi
}

# main runs from a single parsed function and exits on the same line: `git pull` may rewrite this file
# while it runs, and bash reads scripts lazily.
main "$@"; exit $?
