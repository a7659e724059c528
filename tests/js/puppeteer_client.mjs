// Drive Chromium through the CDP proxy with puppeteer-core, as a customer's Node client would.
//
// usage: node puppeteer_client.mjs <browserWSEndpoint> [<header-name>: <value>]
//
// Connects with browserWSEndpoint (executablePath is not needed to connect), counts the pages it sees,
// opens a page, loads a data: URL, evaluates in it, closes the page and disconnects. Prints one JSON
// line with what it saw; exits non-zero (reason on stderr) on any failure.
import puppeteer from "puppeteer-core";

const [endpoint, header] = process.argv.slice(2);
if (!endpoint) {
  console.error("usage: node puppeteer_client.mjs <browserWSEndpoint> [<header-name>: <value>]");
  process.exit(2);
}
const headers = {};
if (header) {
  const colon = header.indexOf(":");
  headers[header.slice(0, colon).trim()] = header.slice(colon + 1).trim();
}

const watchdog = setTimeout(() => {
  console.error("puppeteer client timed out");
  process.exit(3);
}, 60_000);

try {
  const browser = await puppeteer.connect({ browserWSEndpoint: endpoint, headers, protocolTimeout: 30_000 });
  try {
    const pagesBefore = (await browser.pages()).length;
    const version = await browser.version();
    const page = await browser.newPage();
    await page.goto("data:text/html,<title>puppeteer</title><p>hello</p>");
    const title = await page.title();
    const answer = await page.evaluate(() => 6 * 7);
    await page.close();
    console.log(JSON.stringify({ pagesBefore, version, title, answer }));
  } finally {
    await browser.disconnect();
  }
} catch (error) {
  console.error(`puppeteer client failed: ${error?.message ?? error}`);
  process.exitCode = 1;
} finally {
  clearTimeout(watchdog);
}
