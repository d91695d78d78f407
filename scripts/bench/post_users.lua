-- wrk script of scripts/bench.sh: POST /api/users with a unique name and e-mail per
-- request (a run tag from $BENCH_RUN, the thread number, a per-thread counter), so a
-- phase's users can be found again by their e-mail: bench-$BENCH_RUN-….
-- The bearer token comes from $BENCH_TOKEN.
--
-- Flat out by default. With $BENCH_RATE (requests per second, all threads together)
-- and $BENCH_THREADS (wrk's -t), each thread paces its requests: every connection asks
-- delay() before each request, and gets the next free slot of its thread's schedule
-- (one slot every 1000 * threads / rate ms). A thread that falls behind does not
-- catch up in a burst: the schedule restarts from now. The connections (-c) only need
-- to cover rate × latency.
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

local rate = tonumber(os.getenv("BENCH_RATE") or "")
if rate and rate > 0 then
    -- wrk's Lua is LuaJIT: its FFI reads the monotonic clock (os.clock() is CPU time,
    -- os.time() whole seconds).
    local ffi = require("ffi")
    ffi.cdef [[
        typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
        int clock_gettime(int clock_id, bench_timespec *tp);
    ]]
    local CLOCK_MONOTONIC = 1
    local ts = ffi.new("bench_timespec")
    local function now_ms()
        ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
        return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
    end
    local interval_ms = 1000 * (tonumber(os.getenv("BENCH_THREADS") or "") or 1) / rate
    local next_slot = nil

    function delay()
        local now = now_ms()
        if next_slot == nil or next_slot < now then
            next_slot = now
        end
        local wait = next_slot - now
        next_slot = next_slot + interval_ms
        return math.floor(wait + 0.5)
    end
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
