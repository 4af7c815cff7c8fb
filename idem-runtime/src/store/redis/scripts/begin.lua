-- begin: claim the key, or answer why not.
-- KEYS[1]: the record. ARGV[1]: token (16 bytes), then the fingerprint field (a length byte, 0 or
-- 16, and the fingerprint). ARGV[2]: lease ttl in ms. ARGV[3]: fence retention in ms.
-- Replies: integer fence (acquired); {ms left} (in flight, alive); the record itself as a bulk
-- string (done, or not a record this script knows: the client decodes it).
--
-- Records: 'I' token fplen fp fence(16 digits) expiry(ms, by Redis's clock) while in flight;
-- 'F' fence(16 digits) once released; 'X' fence(16 digits) once forgotten by an operator; 'D' token fplen fp output once done. In-flight and released
-- records outlive the lease by the fence retention, so the next lease's fence is the last one + 1
-- whatever Redis's clock does.
local v = redis.call('GET', KEYS[1])
local last
local t
if v then
  local tag = string.byte(v, 1)
  if tag == 73 then
    local n = string.byte(v, 18)
    t = redis.call('TIME')
    local now = t[1] * 1000 + math.floor(t[2] / 1000)
    if tonumber(string.sub(v, 35 + n)) > now then
      if string.sub(v, 2, 17) == string.sub(ARGV[1], 1, 16) then
        -- A retried begin of the holder: the same lease, renewed.
        redis.call('SET', KEYS[1], string.sub(v, 1, 34 + n) .. string.format('%d', now + ARGV[2]),
          'PX', ARGV[2] + ARGV[3])
        return tonumber(string.sub(v, 19 + n, 34 + n))
      end
      return {tonumber(string.sub(v, 35 + n)) - now}
    end
    last = tonumber(string.sub(v, 19 + n, 34 + n))
  elseif tag == 70 or tag == 88 then
    -- Released ('F'), or forgotten by an operator ('X'): claimable, the fence goes on.
    last = tonumber(string.sub(v, 2, 17))
  else
    return v
  end
end
t = t or redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local f = t[1] * 1000000 + t[2]
if last and last >= f then f = last + 1 end
redis.call('SET', KEYS[1], 'I' .. ARGV[1] .. string.format('%016d', f) ..
  string.format('%d', now + ARGV[2]), 'PX', ARGV[2] + ARGV[3])
return f
