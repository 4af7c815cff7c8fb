-- extend: renew an in-flight record this token holds.
-- KEYS[1]: the record. ARGV[1]: 'I' .. token (17 bytes). ARGV[2]: ttl in ms. ARGV[3]: fence
-- retention in ms. Reply: 1 renewed, 0 not ours.
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 17) == ARGV[1] then
  local n = string.byte(v, 18)
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  redis.call('SET', KEYS[1], string.sub(v, 1, 34 + n) .. string.format('%d', now + ARGV[2]),
    'PX', ARGV[2] + ARGV[3])
  return 1
end
return 0
