# Shared by the benchmark scripts (sourced, not run).

# The command as one line a shell can run again (arguments quoted only where needed).
shell_join() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}
