-- forget: leave a forgotten record ('X' and a fence above every earlier one) in place of a done
-- key or a lease, so the next delivery runs and a late mark (or renewal) of the holder before is
-- refused (the operations API: forget, release_stuck).
-- KEYS[1]: the record. ARGV[1]: 1 if a done record may be forgotten. ARGV[2]: 1 if a live lease
-- may be (forced). ARGV[3]: how long the forgotten record is kept, in ms.
-- Replies: the new fence (freed), 0 (no record, or a free one: nothing to do), -1 (refused).
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local tag = string.byte(v, 1)
local t = redis.call('TIME')
local now_us = t[1] * 1000000 + t[2]
local last
if tag == 68 then
  if ARGV[1] ~= '1' then return -1 end
  -- A done record keeps no fence: the clock's, as for a key without a record.
  last = 0
elseif tag == 73 then
  local n = string.byte(v, 18)
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  if tonumber(string.sub(v, 35 + n)) > now and ARGV[2] ~= '1' then return -1 end
  last = tonumber(string.sub(v, 19 + n, 34 + n))
elseif tag == 70 or tag == 88 then
  return 0
else
  return -1
end
local f = now_us
if last >= f then f = last + 1 end
redis.call('SET', KEYS[1], 'X' .. string.format('%016d', f), 'PX', ARGV[3])
return f
