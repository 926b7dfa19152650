--[[
datasync burst_buffer.lua: Slurm burst_buffer/lua stage-in of datasync versions.

A job declares each dataset it reads with one directive line (before the first command of
its batch script, like #SBATCH lines):

    #BB_LUA datasync dataset=DATASET@REF site=SITE name=NAME

NAME is an upper-case identifier ([A-Z][A-Z0-9_]*). The job then stays PENDING with
Reason=BurstBufferStageIn until every version is READY (resident and verified) at its site,
and runs with DATASYNC_<NAME>_PATH set to each view's path.

Hooks:
  slurm_bb_job_process   at submit: directive syntax, then `datasync stage --dry-run` per
                         directive (unknown dataset, ref or site); an error refuses the job.
  slurm_bb_data_in       creates one stage request per directive, idempotent per
                         (job key, version, site), with the job's expected start time as its
                         deadline. With slurm_bb_test_data_in (Slurm >= 24.05, detected by
                         slurm.SLURM_BB_BUSY) it returns at once and test_data_in polls.
                         Without it (Slurm 22.05 and 23.x) it waits (`datasync stage --wait`),
                         bounded by burst_buffer.conf's StageInTimeout less a margin, so a
                         timeout is reported by datasync rather than by a kill.
  slurm_bb_test_data_in  polls: BUSY until READY; an error on a permanent failure.
  slurm_bb_paths         exports DATASYNC_<NAME>_PATH from a file data_in wrote in the job's
                         state directory (slurm_bb_paths runs inside slurmctld with locks
                         held, so it must not start a process when it can avoid it).
  slurm_bb_job_teardown  `datasync release --job-id KEY`: the job's pins are dropped.
  slurm_bb_get_status    `scontrol show bbstat`: the settings this script runs with.

A failure (for example a version whose source is gone: `datasync stage` exit 4) returns
slurm.ERROR with datasync's reason; Slurm then holds the job and shows the reason in its
Reason/StateDesc and in its system comment.

Settings come only from datasync-bb.conf beside this file (key=value lines, # comments):
  datasync=   path of the datasync CLI (required unless api= is set)
  config=     DATASYNC_CONFIG for the CLI (optional)
  home=       DATASYNC_HOME for the CLI (optional)
  api=        base URL of `datasync serve` (optional; then curl talks to the HTTP API)
  token_file= file holding an API token, sent as a bearer token (optional, with api=)

The stage requests' job key is "slurm:<ClusterName>:<job id>", so clusters that share one
datasync database never mix their jobs: `datasync release --job-id slurm:CLUSTER:ID` drops
a job's pins by hand.

Every hook is idempotent: Slurm re-runs stage-in after a slurmctld restart.
All hooks run as SlurmUser (normally root or slurm).
]]

-- Everything internal lives in one table, so cli tools and tests can reuse the parser.
datasync_bb = datasync_bb or {}
local D = datasync_bb

D.KEYS = { datasync = true, config = true, home = true, api = true, token_file = true }
D.DIRECTIVE_HELP = "expected '#BB_LUA datasync dataset=DATASET@REF site=SITE name=NAME'"
D.ENV_FILE = "datasync.env"
D.DEFAULT_STAGE_IN_TIMEOUT = 86400 -- burst_buffer.conf's default for the lua plugin
D.POLL_SECONDS = 5

-- ---------------------------------------------------------------- small helpers

local function trim(s)
	return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

local function log(fmt, ...)
	if slurm and slurm.log_info then
		slurm.log_info("datasync burst_buffer.lua: " .. fmt, ...)
	end
end

function D.shell_quote(s)
	return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

function D.script_dir()
	local source = debug.getinfo(1, "S").source
	return source:match("^@(.*)/[^/]*$") or "."
end

local function read_file(path)
	local f = io.open(path, "r")
	if not f then
		return nil
	end
	local text = f:read("*a")
	f:close()
	return text
end

-- key=value settings of a Slurm-style file, keys lower-cased (slurm.conf, burst_buffer.conf).
local function slurm_conf_value(path, wanted)
	local text = read_file(path)
	if not text then
		return nil
	end
	local value
	for line in text:gmatch("[^\n]+") do
		local k, v = line:gsub("#.*$", ""):match("^%s*([%w_]+)%s*=%s*(%S+)")
		if k and k:lower() == wanted:lower() then
			value = v
		end
	end
	return value
end

-- ------------------------------------------------------------------ settings

-- Read datasync-bb.conf; returns conf or nil, message.
function D.load_conf(dir)
	dir = dir or D.script_dir()
	local path = dir .. "/datasync-bb.conf"
	local text = read_file(path)
	if not text then
		return nil, "cannot read " .. path
	end
	local conf = { dir = dir, path = path }
	local n = 0
	for line in (text .. "\n"):gmatch("([^\n]*)\n") do
		n = n + 1
		local s = trim(line)
		if s ~= "" and s:sub(1, 1) ~= "#" then
			local k, v = s:match("^([%w_]+)%s*=%s*(.-)$")
			if not k then
				return nil, string.format("%s:%d: expected key=value, got %q", path, n, s)
			end
			if not D.KEYS[k] then
				return nil, string.format(
					"%s:%d: unknown key %q (known: api, config, datasync, home, token_file)",
					path, n, k)
			end
			if v ~= "" then
				conf[k] = v
			end
		end
	end
	if not conf.datasync and not conf.api then
		return nil, path .. ": set datasync= (the CLI's path) or api= (the HTTP API)"
	end
	if conf.api then
		conf.api = conf.api:gsub("/+$", "")
	end
	conf.slurm_conf = dir .. "/slurm.conf"
	conf.cluster = slurm_conf_value(conf.slurm_conf, "ClusterName") or "slurm"
	conf.state_save = slurm_conf_value(conf.slurm_conf, "StateSaveLocation") or "/var/spool"
	local timeout = tonumber(slurm_conf_value(dir .. "/burst_buffer.conf", "StageInTimeout"))
	conf.stage_in_timeout = timeout or D.DEFAULT_STAGE_IN_TIMEOUT
	return conf
end

-- ---------------------------------------------------------------- directives

local function valid_dataset(name)
	local count = 0
	for segment in (name .. "/"):gmatch("([^/]*)/") do
		count = count + 1
		if not segment:match("^[a-z0-9][a-z0-9._-]*$") or #segment > 64 then
			return false
		end
	end
	return count >= 1 and count <= 3
end

-- Parse one directive's words (after "#BB_LUA"); returns a table or nil, message.
function D.parse_directive(rest)
	local words = {}
	for w in rest:gmatch("%S+") do
		words[#words + 1] = w
	end
	if words[1] ~= "datasync" then
		return nil, string.format("unknown #BB_LUA directive %q: %s", trim(rest),
			D.DIRECTIVE_HELP)
	end
	local d = {}
	for i = 2, #words do
		local k, v = words[i]:match("^([%a_]+)=(.+)$")
		if not k then
			return nil, string.format("%q in %q is not key=value: %s", words[i],
				trim(rest), D.DIRECTIVE_HELP)
		end
		if k ~= "dataset" and k ~= "site" and k ~= "name" then
			return nil, string.format("unknown key %q in %q: %s", k, trim(rest),
				D.DIRECTIVE_HELP)
		end
		if d[k] then
			return nil, string.format("%s= given twice in %q", k, trim(rest))
		end
		d[k] = v
	end
	for _, k in ipairs({ "dataset", "site", "name" }) do
		if not d[k] then
			return nil, string.format("%s= missing in %q: %s", k, trim(rest),
				D.DIRECTIVE_HELP)
		end
	end
	local dataset, ref = d.dataset:match("^([^@]+)@([^@]+)$")
	if not dataset or not valid_dataset(dataset)
		or not ref:match("^[A-Za-z0-9][A-Za-z0-9._-]*$") or #ref > 128 then
		return nil, string.format(
			"dataset=%s: use DATASET@REF (DATASET: 1-3 '/'-separated segments of a-z 0-9 . _ -;"
			.. " REF: a label or version id)", d.dataset)
	end
	if not d.site:match("^[A-Za-z0-9_-]+$") then
		return nil, string.format("site=%s: a site name is letters, digits, '-' and '_'",
			d.site)
	end
	if not d.name:match("^[A-Z][A-Z0-9_]*$") then
		return nil, string.format(
			"name=%s: use an upper-case identifier ([A-Z][A-Z0-9_]*); it becomes DATASYNC_%s_PATH",
			d.name, d.name:upper())
	end
	return { ref = d.dataset, site = d.site, name = d.name }
end

-- The datasync directives of a job script. Like Slurm, only the leading comment block is
-- read (it stops at the first line that is not a comment). Returns a list or nil, message.
function D.parse_script_text(text)
	local list, names = {}, {}
	for line in text:gmatch("[^\n]+") do
		if line:sub(1, 1) ~= "#" then
			break
		end
		local rest = line:match("^#BB_LUA(.*)$")
		if rest then
			if rest:match("\\%s*$") then
				return nil, "continued #BB_LUA lines are not supported: " .. D.DIRECTIVE_HELP
			end
			local d, err = D.parse_directive(rest)
			if not d then
				return nil, err
			end
			if names[d.name] then
				return nil, string.format("name=%s is used by two directives", d.name)
			end
			names[d.name] = true
			list[#list + 1] = d
		end
	end
	if #list == 0 then
		return nil, "no datasync directive: " .. D.DIRECTIVE_HELP
	end
	return list
end

function D.parse_script(path)
	local text = read_file(path)
	if not text then
		return nil, "cannot read the job script " .. tostring(path)
	end
	return D.parse_script_text(text)
end

-- ------------------------------------------------------------------ JSON

-- A small JSON decoder: datasync prints one JSON document per command.
function D.json_decode(s)
	local pos = 1
	local value
	local function ws()
		pos = s:find("[^ \t\r\n]", pos) or (#s + 1)
	end
	local function fail(what)
		error(string.format("bad JSON at %d: %s", pos, what), 0)
	end
	local escapes = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f",
		n = "\n", r = "\r", t = "\t" }
	local function str()
		pos = pos + 1
		local out = {}
		while true do
			local c = s:sub(pos, pos)
			if c == "" then
				fail("unterminated string")
			elseif c == '"' then
				pos = pos + 1
				return table.concat(out)
			elseif c == "\\" then
				local e = s:sub(pos + 1, pos + 1)
				if e == "u" then
					local code = tonumber(s:sub(pos + 2, pos + 5), 16) or fail("bad \\u")
					out[#out + 1] = code < 128 and string.char(code) or "?"
					pos = pos + 6
				else
					out[#out + 1] = escapes[e] or fail("bad escape")
					pos = pos + 2
				end
			else
				out[#out + 1] = c
				pos = pos + 1
			end
		end
	end
	function value()
		ws()
		local c = s:sub(pos, pos)
		if c == "{" then
			local obj = {}
			pos = pos + 1
			ws()
			if s:sub(pos, pos) == "}" then
				pos = pos + 1
				return obj
			end
			while true do
				ws()
				if s:sub(pos, pos) ~= '"' then
					fail("expected a key")
				end
				local k = str()
				ws()
				if s:sub(pos, pos) ~= ":" then
					fail("expected ':'")
				end
				pos = pos + 1
				obj[k] = value()
				ws()
				local sep = s:sub(pos, pos)
				pos = pos + 1
				if sep == "}" then
					return obj
				elseif sep ~= "," then
					fail("expected ',' or '}'")
				end
			end
		elseif c == "[" then
			local arr = {}
			pos = pos + 1
			ws()
			if s:sub(pos, pos) == "]" then
				pos = pos + 1
				return arr
			end
			while true do
				arr[#arr + 1] = value()
				ws()
				local sep = s:sub(pos, pos)
				pos = pos + 1
				if sep == "]" then
					return arr
				elseif sep ~= "," then
					fail("expected ',' or ']'")
				end
			end
		elseif c == '"' then
			return str()
		elseif s:sub(pos, pos + 3) == "true" then
			pos = pos + 4
			return true
		elseif s:sub(pos, pos + 4) == "false" then
			pos = pos + 5
			return false
		elseif s:sub(pos, pos + 3) == "null" then
			pos = pos + 4
			return nil
		else
			local num = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
			if not num or num == "" then
				fail("unexpected character")
			end
			pos = pos + #num
			return tonumber(num)
		end
	end
	local ok, result = pcall(value)
	if not ok then
		return nil, result
	end
	return result
end

local function json_string(s)
	return '"' .. tostring(s):gsub('[%c"\\]', function(c)
		return string.format("\\u%04x", c:byte())
	end) .. '"'
end

-- ---------------------------------------------------------------- commands

-- Run a shell command; returns exit status, stdout, stderr. Lua 5.1's io.popen():close()
-- does not report the exit status (and os.execute's encoding differs between versions),
-- so the shell prints it as the last line of stdout.
function D.run(cmd)
	local errfile = os.tmpname()
	local p = io.popen("( " .. cmd .. " ) 2>" .. D.shell_quote(errfile)
		.. " </dev/null; echo \"__datasync_exit=$?\"")
	local out = p:read("*a")
	p:close()
	local err = read_file(errfile) or ""
	os.remove(errfile)
	local body, code = out:match("^(.-)__datasync_exit=(%d+)%s*$")
	if not code then
		return 1, out, err
	end
	return tonumber(code), body, err
end

local function cli_prefix(conf)
	local env = { "env" }
	if conf.config then
		env[#env + 1] = "DATASYNC_CONFIG=" .. D.shell_quote(conf.config)
	end
	if conf.home then
		env[#env + 1] = "DATASYNC_HOME=" .. D.shell_quote(conf.home)
	end
	env[#env + 1] = D.shell_quote(conf.datasync)
	return table.concat(env, " ")
end

local function last_line(s)
	local line
	for l in s:gmatch("[^\n]+") do
		if trim(l) ~= "" then
			line = trim(l)
		end
	end
	return line
end

-- A one-line message for a failed datasync command.
local function cli_error(what, code, out, err)
	local msg = last_line(err) or last_line(out) or ("exit status " .. code)
	msg = msg:gsub("^datasync: error: ", "")
	return string.format("%s: %s", what, msg)
end

local function curl(conf, method, path, body)
	local parts = { "curl -sS --max-time 60 -o - -w '\\n__http=%{http_code}'",
		"-X " .. method, "-H 'Accept: application/json'" }
	local stdin = ""
	if conf.token_file then
		-- The token reaches curl on stdin, never on a command line others can read.
		stdin = "printf 'Authorization: Bearer %s\\n' \"$(cat "
			.. D.shell_quote(conf.token_file) .. ")\" | "
		parts[#parts + 1] = "-H @-"
	end
	if body then
		parts[#parts + 1] = "-H 'Content-Type: application/json' --data-binary "
			.. D.shell_quote(body)
	end
	parts[#parts + 1] = D.shell_quote(conf.api .. path)
	local code, out, err = D.run(stdin .. table.concat(parts, " "))
	local text, status = out:match("^(.*)\n__http=(%d+)%s*$")
	if code ~= 0 or not status then
		return nil, nil, "cannot reach " .. conf.api .. ": " .. (last_line(err) or "curl failed")
	end
	local doc = D.json_decode(text)
	return tonumber(status), doc, text
end

-- `datasync stage --dry-run`: nil when DATASET@REF and SITE are known, else a message.
function D.check(conf, d)
	if conf.api then
		local status, doc = curl(conf, "GET", "/api/v1/versions/" .. d.ref)
		if status ~= 200 then
			return string.format("%s: %s", d.ref,
				(type(doc) == "table" and doc.error) or ("HTTP " .. tostring(status)))
		end
		local _, sites = curl(conf, "GET", "/api/v1/sites")
		local names = {}
		for _, site in ipairs(type(sites) == "table" and sites or {}) do
			if type(site) == "table" and site.name then
				names[#names + 1] = site.name
				if site.name == d.site then
					return nil
				end
			end
		end
		-- The CLI's words, so both modes read alike.
		return string.format("unknown site '%s' (sites: %s)", d.site, table.concat(names, ", "))
	end
	local code, out, err = D.run(string.format("%s stage %s --site %s --dry-run --json",
		cli_prefix(conf), D.shell_quote(d.ref), D.shell_quote(d.site)))
	if code ~= 0 then
		-- datasync's own message names the unknown dataset, ref or site.
		return (cli_error("", code, out, err):gsub("^: ", ""))
	end
	return nil
end

-- One stage request (idempotent per job key, version and site). Returns a result table
-- {state, path, reason, permanent, timed_out} or nil, message for other errors.
function D.stage(conf, d, key, deadline, wait_seconds)
	if conf.api then
		local body = string.format('{"ref":%s,"site":%s,"job_id":%s,"deadline":%s}',
			json_string(d.ref), json_string(d.site), json_string(key),
			deadline and json_string(deadline) or "null")
		local started = os.time()
		while true do
			local status, doc, text = curl(conf, "POST", "/api/v1/stage", body)
			if not status then
				return nil, text
			end
			if status ~= 200 or type(doc) ~= "table" then
				local msg = type(doc) == "table" and doc.error or ("HTTP " .. status)
				return nil, string.format("%s at site %s: %s", d.ref, d.site, tostring(msg))
			end
			if doc.state == "FAILED" then
				doc.permanent = true
				return doc
			end
			if doc.state == "READY" or not wait_seconds then
				return doc
			end
			if os.time() - started >= wait_seconds then
				doc.timed_out = true
				return doc
			end
			os.execute("sleep " .. D.POLL_SECONDS)
		end
	end
	local cmd = string.format("%s stage %s --site %s --job-id %s --json", cli_prefix(conf),
		D.shell_quote(d.ref), D.shell_quote(d.site), D.shell_quote(key))
	if deadline then
		cmd = cmd .. " --deadline " .. D.shell_quote(deadline)
	end
	if wait_seconds then
		cmd = cmd .. " --wait --timeout " .. math.max(1, math.floor(wait_seconds))
	end
	local code, out, err = D.run(cmd)
	local doc = D.json_decode(out)
	if type(doc) ~= "table" or (code ~= 0 and code ~= 3 and code ~= 4) then
		return nil, cli_error(d.ref .. " at site " .. d.site, code, out, err)
	end
	doc.permanent = code == 4 or doc.state == "FAILED"
	doc.timed_out = code == 3
	if doc.permanent and not doc.reason then
		doc.reason = last_line(err)
	end
	return doc
end

function D.release(conf, key)
	if conf.api then
		local status, doc = curl(conf, "POST", "/api/v1/stage/release",
			string.format('{"job_id":%s}', json_string(key)))
		if status ~= 200 then
			return string.format("release of %s: %s", key,
				(type(doc) == "table" and doc.error) or ("HTTP " .. tostring(status)))
		end
		return nil
	end
	local code, out, err = D.run(string.format("%s release --job-id %s --json",
		cli_prefix(conf), D.shell_quote(key)))
	if code ~= 0 then
		return cli_error("release of " .. key, code, out, err)
	end
	return nil
end

-- ------------------------------------------------------------------ stage-in

function D.job_key(conf, job_id)
	return string.format("slurm:%s:%s", conf.cluster, tostring(job_id))
end

-- The job's expected start as an ISO 8601 UTC time, or nil when Slurm has none. Slurm >=
-- 23.02 passes job_info; 22.05 does not, so squeue (which prints local time) is asked.
function D.expected_start(conf, job_id, job_info)
	local t
	if type(job_info) == "table" and tonumber(job_info["start_time"]) then
		t = tonumber(job_info["start_time"])
	else
		local code, out = D.run(string.format("SLURM_CONF=%s squeue --start -h -j %s -o %%S",
			D.shell_quote(conf.slurm_conf), D.shell_quote(job_id)))
		local y, mo, da, h, mi, se = (out or ""):match("(%d+)-(%d+)-(%d+)T(%d+):(%d+):(%d+)")
		if code == 0 and y then
			t = os.time({ year = tonumber(y), month = tonumber(mo), day = tonumber(da),
				hour = tonumber(h), min = tonumber(mi), sec = tonumber(se) })
		end
	end
	if not t or t <= 0 then
		return nil
	end
	-- A start already due still gets a deadline in the future: datasync orders by it.
	t = math.max(t, os.time() + 60)
	return os.date("!%Y-%m-%dT%H:%M:%SZ", t)
end

function D.job_dir(conf, job_id)
	return string.format("%s/hash.%d/job.%s", conf.state_save, tonumber(job_id) % 10, job_id)
end

local function write_env(conf, job_id, list, results)
	local dir = D.job_dir(conf, job_id)
	os.execute("mkdir -p " .. D.shell_quote(dir))
	local lines = {}
	for i, d in ipairs(list) do
		lines[#lines + 1] = string.format("DATASYNC_%s_PATH=%s\n", d.name, results[i].path or "")
	end
	local f, err = io.open(dir .. "/" .. D.ENV_FILE, "w")
	if not f then
		return "cannot write " .. dir .. "/" .. D.ENV_FILE .. ": " .. tostring(err)
	end
	f:write(table.concat(lines))
	f:close()
	return nil
end

local function failure(d, r)
	if r.permanent then
		return string.format("datasync: %s at site %s failed: %s", d.ref, d.site,
			tostring(r.reason or "no reason given"))
	end
	local eta = tonumber(r.eta_seconds)
	return string.format("datasync: %s at site %s not ready before StageInTimeout (state %s%s)",
		d.ref, d.site, tostring(r.state), eta and string.format(", ETA %.0f s", eta) or "")
end

-- One pass over the job's directives. wait_until (os.time) makes it wait, as on 22.05.
-- Returns "READY", "BUSY", or nil, message.
function D.stage_in(job_id, job_script, job_info, wait_until)
	local conf, err = D.load_conf()
	if not conf then
		return nil, err
	end
	local list
	list, err = D.parse_script(job_script)
	if not list then
		return nil, err
	end
	local key = D.job_key(conf, job_id)
	local deadline = D.expected_start(conf, job_id, job_info)
	-- Submit every request before waiting on any, so they proceed together.
	local results, pending = {}, false
	for i, d in ipairs(list) do
		local r, e = D.stage(conf, d, key, deadline, nil)
		if not r then
			return nil, "datasync: " .. e
		end
		if r.permanent then
			return nil, failure(d, r)
		end
		results[i] = r
		pending = pending or r.state ~= "READY"
	end
	if pending and wait_until then
		for i, d in ipairs(list) do
			if results[i].state ~= "READY" then
				local r, e = D.stage(conf, d, key, deadline, math.max(1, wait_until - os.time()))
				if not r then
					return nil, "datasync: " .. e
				end
				if r.permanent or r.state ~= "READY" then
					return nil, failure(d, r)
				end
				results[i] = r
			end
		end
		pending = false
	end
	if pending then
		return "BUSY"
	end
	err = write_env(conf, job_id, list, results)
	if err then
		return nil, err
	end
	log("job %s: %d version(s) ready", tostring(job_id), #list)
	return "READY"
end

local function has_test_data_in()
	return slurm ~= nil and slurm.SLURM_BB_BUSY ~= nil
end

-- ------------------------------------------------------------------ Slurm hooks

-- Runs inside slurmctld at submit (it must return quickly: one `datasync stage
-- --dry-run` per directive, or two HTTP GETs with api=).
function slurm_bb_job_process(job_script, uid, gid, job_info)
	local conf, err = D.load_conf()
	if not conf then
		return slurm.ERROR, err
	end
	local list
	list, err = D.parse_script(job_script)
	if not list then
		return slurm.ERROR, err
	end
	for _, d in ipairs(list) do
		err = D.check(conf, d)
		if err then
			log("refused a job: %s", err)
			return slurm.ERROR, "datasync: " .. err
		end
	end
	return slurm.SUCCESS
end

function slurm_bb_pools()
	-- datasync tracks its own capacity (site quotas); Slurm has no pools to count.
	return slurm.SUCCESS
end

function slurm_bb_job_teardown(job_id, job_script, hurry, uid, gid)
	local conf, err = D.load_conf()
	if not conf then
		return slurm.ERROR, err
	end
	err = D.release(conf, D.job_key(conf, job_id))
	if err then
		log("job %s: %s", tostring(job_id), err)
		return slurm.ERROR, "datasync: " .. err
	end
	return slurm.SUCCESS
end

function slurm_bb_setup(job_id, uid, gid, pool, bb_size, job_script, job_info)
	return slurm.SUCCESS
end

function slurm_bb_data_in(job_id, job_script, uid, gid, job_info)
	local wait_until
	if not has_test_data_in() then
		-- Slurm kills data_in at StageInTimeout; stop waiting a little earlier so the job
		-- is held with datasync's words instead.
		local conf, err = D.load_conf()
		if not conf then
			return slurm.ERROR, err
		end
		local margin = math.min(60, math.floor(conf.stage_in_timeout / 10))
		wait_until = os.time() + conf.stage_in_timeout - margin
	end
	local state, err = D.stage_in(job_id, job_script, job_info, wait_until)
	if not state then
		log("job %s: %s", tostring(job_id), err)
		return slurm.ERROR, err
	end
	return slurm.SUCCESS
end

function slurm_bb_test_data_in(job_id, job_script, uid, gid, job_info)
	local state, err = D.stage_in(job_id, job_script, job_info, nil)
	if not state then
		log("job %s: %s", tostring(job_id), err)
		return slurm.ERROR, err
	end
	if state == "BUSY" then
		return slurm.SUCCESS, slurm.SLURM_BB_BUSY
	end
	return slurm.SUCCESS
end

function slurm_bb_real_size(job_id, uid, gid, job_info)
	return slurm.SUCCESS
end

-- Runs inside slurmctld with locks held: reads the file stage-in wrote beside path_file
-- (both live in the job's state directory) and falls back to asking datasync.
function slurm_bb_paths(job_id, job_script, path_file, uid, gid, job_info)
	local dir = path_file:match("^(.*)/[^/]*$") or "."
	local text = read_file(dir .. "/" .. D.ENV_FILE)
	if not text then
		local state, err = D.stage_in(job_id, job_script, job_info, nil)
		if state ~= "READY" then
			return slurm.ERROR, err or "datasync: the data is not staged yet"
		end
		local conf = D.load_conf()
		text = read_file(D.job_dir(conf, job_id) .. "/" .. D.ENV_FILE) or ""
	end
	local f, err = io.open(path_file, "a")
	if not f then
		return slurm.ERROR, "cannot write " .. path_file .. ": " .. tostring(err)
	end
	f:write(text)
	f:close()
	return slurm.SUCCESS
end

function slurm_bb_pre_run(job_id, job_script, uid, gid, job_info)
	return slurm.SUCCESS
end

function slurm_bb_post_run(job_id, job_script, uid, gid, job_info)
	return slurm.SUCCESS
end

function slurm_bb_data_out(job_id, job_script, uid, gid, job_info)
	return slurm.SUCCESS
end

function slurm_bb_test_data_out(job_id, job_script, uid, gid, job_info)
	return slurm.SUCCESS
end

-- `scontrol show bbstat`: how this script is set up (arguments are ignored).
function slurm_bb_get_status(...)
	local conf, err = D.load_conf()
	if not conf then
		return slurm.SUCCESS, "datasync burst buffer: " .. err .. "\n"
	end
	local lines = {
		"datasync burst buffer (" .. conf.path .. ")",
		"  via:             " .. (conf.api and ("HTTP API " .. conf.api) or conf.datasync),
		"  config:          " .. (conf.config or "-"),
		"  home:            " .. (conf.home or "-"),
		"  stage-in:        " .. (has_test_data_in()
			and "data_in submits, test_data_in polls"
			or "data_in waits (no test_data_in in this Slurm)"),
		"  StageInTimeout:  " .. conf.stage_in_timeout .. " s",
		"  job key:         " .. D.job_key(conf, "<job id>"),
	}
	return slurm.SUCCESS, table.concat(lines, "\n") .. "\n"
end
