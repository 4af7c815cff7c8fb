-- release: give back an in-flight record this token holds; its fence stays in a released record.
-- KEYS[1]: the record. ARGV[1]: 'I' .. token (17 bytes). ARGV[2]: fence retention in ms.
-- Reply: 1 released, 0 not ours (nothing done).
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 17) == ARGV[1] then
  local n = string.byte(v, 18)
  redis.call('SET', KEYS[1], 'F' .. string.sub(v, 19 + n, 34 + n), 'PX', ARGV[2])
  return 1
end
return 0
