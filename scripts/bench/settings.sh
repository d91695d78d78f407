# The settings every userhub process of the benchmarks runs with (scripts/bench.sh,
# scripts/bench/instructions.sh): APP_ENV=production, rate limits off, log level warn,
# an HS256 bearer-token secret; and the path the ceiling is asked for. Sourced, not run.

# examples/ceiling.rs answers any uuid with a fixed user; the benchmarks ask for this one.
ceiling_path=/api/users/0193a0a0-0000-7000-8000-000000000000

# userhub_settings SECRET ISSUER AUDIENCE: sets the array userhub_env to those settings;
# a profile's URLs and the port come on top (a later VAR=VALUE wins with env).
userhub_settings() {
    local secret=$1 issuer=$2 audience=$3
    userhub_env=(
        APP_ENV=production
        APP__SERVER__HOST=127.0.0.1
        APP__SERVER__DRAIN_SECS=0
        APP__SERVER__SHUTDOWN_TIMEOUT_SECS=5
        APP__AUTH__HS256_SECRET="$secret"
        APP__AUTH__ISSUER="$issuer"
        APP__AUTH__AUDIENCE="$audience"
        APP__CONSOLE__SESSION_KEY="bench-console-session-key-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
        APP__RATE_LIMIT__ENABLED=false
        APP__LOG__LEVEL=warn
    )
}
