-- wrk script of scripts/bench.sh: POST /api/users with a unique name and e-mail per
-- request (a run nonce from $BENCH_RUN, the thread number, a per-thread counter).
-- The bearer token comes from $BENCH_TOKEN.
local threads = {}
local next_id = 0

function setup(thread)
    next_id = next_id + 1
    thread:set("tid", next_id)
    table.insert(threads, thread)
end

local run = os.getenv("BENCH_RUN") or tostring(os.time())
local token = os.getenv("BENCH_TOKEN") or ""
-- Globals, not locals: done() reads each thread's through thread:get().
counter = 0
created = 0
other = 0

function request()
    counter = counter + 1
    local body = string.format(
        '{"name":"Bench User %s %d %d","email":"bench-%s-%d-%d@example.com"}',
        run, tid, counter, run, tid, counter)
    return wrk.format("POST", "/api/users", {
        ["Content-Type"] = "application/json",
        ["Authorization"] = "Bearer " .. token,
    }, body)
end

function response(status, headers, body)
    if status == 201 then
        created = created + 1
    else
        other = other + 1
    end
end

function done(summary, latency, requests)
    local c, o = 0, 0
    for _, thread in ipairs(threads) do
        c = c + thread:get("created")
        o = o + thread:get("other")
    end
    io.write(string.format("BENCH created=%d other=%d\n", c, o))
end
